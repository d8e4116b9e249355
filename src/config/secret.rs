//! Files that hold secrets (`[server] admin-token-file`, a probe's
//! `api-key-file`): a path relative to the main file's directory, or a
//! systemd credential, `credential:NAME`, which is
//! `$CREDENTIALS_DIRECTORY/NAME` (`LoadCredential=NAME:/path` in the unit).
//!
//! Messages name the file, never its contents.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::check::Checker;
use super::{Secret, Source};

/// The prefix of a systemd credential reference.
pub const CREDENTIAL: &str = "credential:";

/// Where the secret named by `value` lives: `base`/`value`, or for
/// `credential:NAME` the file NAME in `credentials` (systemd's
/// `$CREDENTIALS_DIRECTORY`).
pub fn secret_path(
    value: &str,
    base: &Path,
    credentials: Option<&Path>,
) -> Result<PathBuf, String> {
    let Some(name) = value.strip_prefix(CREDENTIAL) else {
        return Ok(base.join(value));
    };
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!(
            "{value:?} is not a credential name (credential:NAME, NAME as in LoadCredential=NAME:…)"
        ));
    }
    match credentials {
        Some(dir) if !dir.as_os_str().is_empty() => Ok(dir.join(name)),
        _ => Err(format!(
            "{value} needs CREDENTIALS_DIRECTORY, which is not set: start under systemd with \
             LoadCredential={name}:/path/to/file (or name a file instead)"
        )),
    }
}

impl Checker {
    /// Reads the secret in `file` (`what`: "admin token", "API key"); an
    /// unset credential directory, a missing or empty file is an error at
    /// the key's position.
    pub(super) fn secret_file(
        &mut self,
        src: &Source<'_>,
        file: &Spanned<String>,
        what: &str,
    ) -> Option<Secret> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        self.secret_file_in(src, file, what, credentials.as_deref())
    }

    /// [`Checker::secret_file`] with the credential directory given.
    fn secret_file_in(
        &mut self,
        src: &Source<'_>,
        file: &Spanned<String>,
        what: &str,
        credentials: Option<&Path>,
    ) -> Option<Secret> {
        let path = match secret_path(file.get_ref(), &self.base, credentials) {
            Ok(path) => path,
            Err(e) => {
                self.err(src, file.span(), e);
                return None;
            }
        };
        let credential = file.get_ref().starts_with(CREDENTIAL);
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => Some(Secret(text.trim().to_string())),
            Ok(_) => {
                self.err(
                    src,
                    file.span(),
                    format!("{what} file {} is empty", path.display()),
                );
                None
            }
            Err(e) if credential => {
                self.err(
                    src,
                    file.span(),
                    format!(
                        "cannot read {what} credential {} ({}): {e}; is it in the unit's LoadCredential=?",
                        file.get_ref(),
                        path.display()
                    ),
                );
                None
            }
            Err(e) => {
                self.err(
                    src,
                    file.span(),
                    format!("cannot read {what} file {}: {e}", path.display()),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_reference_resolves_in_the_credentials_directory() {
        let base = Path::new("/etc/inferdns");
        let creds = Path::new("/run/credentials/inferdns.service");
        assert_eq!(
            secret_path("credential:admin-token", base, Some(creds)).unwrap(),
            creds.join("admin-token")
        );
        // A plain path is still relative to the main file, credentials or not.
        assert_eq!(
            secret_path("admin.token", base, Some(creds)).unwrap(),
            base.join("admin.token")
        );
        assert_eq!(
            secret_path("/srv/key", base, None).unwrap(),
            Path::new("/srv/key")
        );
    }

    #[test]
    fn a_credential_needs_the_directory_and_a_plain_name() {
        let base = Path::new("/etc/inferdns");
        let e = secret_path("credential:admin-token", base, None).unwrap_err();
        assert!(e.contains("CREDENTIALS_DIRECTORY"), "{e}");
        assert!(e.contains("LoadCredential=admin-token:"), "{e}");
        assert!(secret_path("credential:admin-token", base, Some(Path::new(""))).is_err());
        let creds = Some(Path::new("/run/credentials/x"));
        for bad in [
            "credential:",
            "credential:../etc/shadow",
            "credential:a/b",
            "credential:..",
        ] {
            assert!(secret_path(bad, base, creds).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_credential_is_read_or_missing_at_file_line_col() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("admin-token"), "s3cr3t-value\n").unwrap();
        let path = dir.path().join("inferdns.toml");
        let text = "[server]\nadmin-token-file = \"credential:admin-token\"\n";
        let at = text.find('"').unwrap();
        let source = Source { path: &path, text };
        let value = |name: &str| Spanned::new(at..at + name.len() + 2, name.to_string());
        let mut checker = Checker::new(dir.path().to_path_buf());

        let read = checker.secret_file_in(
            &source,
            &value("credential:admin-token"),
            "admin token",
            Some(&creds),
        );
        assert_eq!(read, Some(Secret("s3cr3t-value".into())));
        assert!(checker.errors.is_empty());

        for missing in [Some(creds.as_path()), None] {
            let read = checker.secret_file_in(
                &source,
                &value("credential:admin-token-typo"),
                "admin token",
                missing,
            );
            assert!(read.is_none());
        }
        let errors: Vec<String> = checker.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let place = format!("{}:2:20: ", path.display());
        assert!(errors.iter().all(|e| e.starts_with(&place)), "{errors:?}");
        assert!(errors[0].contains("LoadCredential"), "{}", errors[0]);
        assert!(errors[1].contains("CREDENTIALS_DIRECTORY"), "{}", errors[1]);
        assert!(errors.iter().all(|e| !e.contains("s3cr3t")));
    }
}
