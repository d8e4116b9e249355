//! What a load learned about its policy files, so that the next reload
//! reads again only the files that changed.
//!
//! Owns: the file keys (device, inode, size, modification and change
//! time) of the policy files that checked cleanly, with the main file they
//! were checked under. A reload of 10,000 policy files spent most of its
//! time opening, reading, parsing and checking files that had not changed.
//!
//! A file is taken from the config in force, not read, only when all of
//! these hold: the main file has the same bytes as then (so the regions,
//! apex, groups and GeoIP settings that a service is checked against are
//! the same); the file's key is the same (an edit, a copy or a rename
//! changes it; nobody can set the change time back); it checked without a
//! problem then; and its service is in the config in force. The checks
//! across services (duplicate names, names the zone has, fallbacks and
//! their loops) run again over every service, taken or read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Config, ConfigError, Service};
use crate::geo::FileKey;

/// The policy files of the config in force that a reload may take from it
/// instead of reading them. Empty at first: everything is read.
#[derive(Debug, Default, Clone)]
pub struct PolicyFiles {
    /// The config these files were loaded into.
    config: Option<Arc<Config>>,
    learned: Learned,
}

/// What one load learned: the main file's text and the clean policy
/// files.
#[derive(Debug, Default, Clone)]
pub struct Learned {
    /// Kept whole (a few hundred kilobytes at 1,000 regions) and compared
    /// byte for byte: no digest to collide.
    pub(super) main: Option<String>,
    pub(super) files: HashMap<PathBuf, Clean>,
    /// Policy files this load read, and those it took from the config in
    /// force without reading them.
    pub read: usize,
    pub kept: usize,
}

/// A policy file that checked without a problem.
#[derive(Debug, Clone)]
pub(super) struct Clean {
    pub key: FileKey,
    /// Its `fallback` (target service id and place): resolved again each
    /// load, since indexes move.
    pub fallback: Option<(String, ConfigError)>,
}

impl PolicyFiles {
    /// `learned` by the load of `config`, now in force.
    pub fn new(config: Arc<Config>, learned: Learned) -> Self {
        PolicyFiles {
            config: Some(config),
            learned,
        }
    }

    /// The number of files a reload may take without reading them.
    pub fn len(&self) -> usize {
        self.learned.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.learned.files.is_empty()
    }

    /// What a load of a main file with `main_text` may take.
    pub(super) fn reuse(&self, main_text: &str) -> Option<Reuse<'_>> {
        let config = self.config.as_deref()?;
        (self.learned.main.as_deref() == Some(main_text)).then(|| Reuse {
            files: &self.learned.files,
            services: config.services.iter().map(|s| (s.id.as_str(), s)).collect(),
        })
    }
}

/// The services a load may take, by policy file.
pub(super) struct Reuse<'a> {
    files: &'a HashMap<PathBuf, Clean>,
    services: HashMap<&'a str, &'a Service>,
}

impl Reuse<'_> {
    /// The service of policy file `path` (service `id`), when the file's
    /// key is still `key`: a copy with its fallback unresolved, and the
    /// fallback to resolve.
    pub fn take(
        &self,
        path: &Path,
        id: &str,
        key: Option<FileKey>,
    ) -> Option<(Service, Option<(String, ConfigError)>)> {
        let clean = self.files.get(path)?;
        if Some(clean.key) != key {
            return None;
        }
        let mut service = (*self.services.get(id)?).clone();
        service.fallback = None;
        Some((service, clean.fallback.clone()))
    }

    /// Whether `path` may be taken if its key is still `key` (checked by
    /// the threads that read the others).
    pub fn fresh(&self, path: &Path, key: Option<FileKey>) -> bool {
        self.files.get(path).is_some_and(|c| Some(c.key) == key)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::config::check::load_text;

    const MAIN: &str = r#"policy-dir = "policies"
[server]
dns-listen = ["127.0.0.1:0"]
[zone]
apex = "inference.example.com"
soa = { primary = "ns1.example.net", contact = "hostmaster.example.net" }
ns = [{ name = "ns1.example.net" }]
[regions.r1]
endpoints = [{ address = "192.0.2.1" }]
[regions.r2]
endpoints = [{ address = "192.0.2.2" }]
"#;

    /// 300 policy files (more than one thread reads), every one but the
    /// first falling back to it.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("inferdns.toml"), MAIN).unwrap();
            std::fs::create_dir(dir.path().join("policies")).unwrap();
            let files = Files { dir };
            for i in 0..300 {
                let fallback = if i == 0 { "" } else { "fallback = \"s0\"\n" };
                files.policy(
                    &format!("s{i}"),
                    &format!("tiers = [[\"r1\"], [\"r2\"]]\n{fallback}"),
                );
            }
            files
        }

        fn main(&self) -> PathBuf {
            self.dir.path().join("inferdns.toml")
        }

        fn policy(&self, id: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(format!("policies/{id}.toml"));
            std::fs::write(&path, text).unwrap();
            path
        }

        /// A load as a reload makes it, with every file's change taken as
        /// settled (`settled` in the future), or as a start does.
        fn load(&self, known: &PolicyFiles, settled: SystemTime) -> (Config, Learned) {
            let text = std::fs::read_to_string(self.main()).unwrap();
            load_text(&self.main(), &text, false, Some((known, settled)))
                .unwrap_or_else(|e| panic!("{e}"))
        }

        /// A load that reads every file.
        fn full(&self) -> Config {
            crate::config::load_for_reload(&self.main()).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    /// Loads again with what the last load learned; checks that the result
    /// is what reading every file gives; returns (read, kept).
    fn reload(files: &Files, known: &mut PolicyFiles) -> (usize, usize) {
        let (config, learned) = files.load(known, later());
        assert_eq!(
            config,
            files.full(),
            "the kept services are the ones a full load reads"
        );
        let counts = (learned.read, learned.kept);
        *known = PolicyFiles::new(Arc::new(config), learned);
        counts
    }

    #[test]
    fn a_reload_reads_only_the_policy_files_that_changed() {
        let files = Files::new();
        let mut known = PolicyFiles::default();
        assert_eq!(reload(&files, &mut known), (300, 0), "nothing known yet");
        assert_eq!(known.len(), 300);
        assert_eq!(reload(&files, &mut known), (0, 300), "nothing changed");

        // An edit is read; the fallbacks into s0 are resolved again.
        files.policy("s5", "tiers = [[\"r1\"], [\"r2\"]]\nttl = 45\n");
        assert_eq!(reload(&files, &mut known), (1, 299));
        let s5 = known
            .config
            .as_ref()
            .unwrap()
            .services
            .iter()
            .find(|s| s.id == "s5");
        assert_eq!(s5.map(|s| s.ttl), Some(45));

        // The same size, the modification time set back: the change time
        // still moved.
        let path = files.dir.path().join("policies/s6.toml");
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        files.policy("s6", "tiers = [[\"r2\"], [\"r1\"]]\nfallback = \"s0\"\n");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(before)
            .unwrap();
        assert_eq!(reload(&files, &mut known), (1, 299));

        // A file removed, one added.
        std::fs::remove_file(files.dir.path().join("policies/s7.toml")).unwrap();
        files.policy("t1", "tiers = [[\"r2\"]]\nfallback = \"s0\"\n");
        assert_eq!(reload(&files, &mut known), (1, 299));

        // The main file changed (a region before the others: every tier's
        // index moves): every file is read and checked again.
        let main = MAIN.replace(
            "[regions.r1]",
            "[regions.r0]\nendpoints = [{ address = \"192.0.2.9\" }]\n[regions.r1]",
        );
        std::fs::write(files.main(), main).unwrap();
        assert_eq!(reload(&files, &mut known), (300, 0));
        assert_eq!(reload(&files, &mut known), (0, 300));

        // A broken file refuses the load, naming its place, and the next
        // load reads it again (the config in force is still the one known).
        files.policy("s8", "tiers = [[\"r1\"]\n");
        let text = std::fs::read_to_string(files.main()).unwrap();
        let errors =
            load_text(&files.main(), &text, false, Some((&known, later()))).expect_err("refused");
        assert!(errors.to_string().contains("s8.toml:1:"), "{errors}");
        files.policy("s8", "tiers = [[\"r1\"]]\n");
        assert_eq!(reload(&files, &mut known), (1, 299));
    }

    /// A file changed within the last two seconds is not remembered: its
    /// key may not move with a second write in the same clock tick. Files
    /// older than that are (the real clock: this test waits two seconds).
    #[test]
    fn a_file_changed_just_now_is_read_again_next_time() {
        let files = Files::new();
        std::thread::sleep(Duration::from_millis(2100));
        let just_now = files.policy("s3", "tiers = [[\"r2\"]]\nfallback = \"s0\"\n");
        let (config, learned) = crate::config::load_known(&files.main(), &PolicyFiles::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((learned.read, learned.kept), (300, 0));
        assert!(!learned.files.contains_key(&just_now), "written just now");
        assert_eq!(learned.files.len(), 299, "written over two seconds ago");
        let known = PolicyFiles::new(Arc::new(config), learned);
        let (config, learned) = crate::config::load_known(&files.main(), &known).unwrap();
        assert_eq!((learned.read, learned.kept), (1, 299));
        assert_eq!(config, files.full());
    }
}
