//! The files the Debian package installs that are generated from the clap
//! definitions: the man page `inferdns(8)` and the shell completions. They
//! live in `packaging/generated/` (so that cargo-deb can take them as
//! assets) and must match what the code generates now:
//!
//!   BLESS=1 cargo test --test packaging     # rewrite them after a CLI change

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use inferdns::cli::Cli;

fn generated_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/generated")
}

/// The man page: clap's sections for the command, then each subcommand's
/// options, then what an operator of the daemon needs (files, signals,
/// exit status).
fn man_page() -> Vec<u8> {
    let cmd = Cli::command().version(env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration")
        .source(format!("inferdns {}", env!("CARGO_PKG_VERSION")))
        .date("");
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    out.extend_from_slice(DESCRIPTION.as_bytes());
    man.render_options_section(&mut out).unwrap();
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        let name = sub.get_name();
        out.extend_from_slice(format!(".SH \"inferdns {name}\"\n").as_bytes());
        let page = clap_mangen::Man::new(sub.clone().name(clap::builder::Str::from(
            format!("inferdns {name}").leak() as &str,
        )));
        let mut synopsis = Vec::new();
        page.render_synopsis_section(&mut synopsis).unwrap();
        out.extend_from_slice(
            String::from_utf8(synopsis)
                .unwrap()
                .replacen(".SH SYNOPSIS", ".SS Synopsis", 1)
                .as_bytes(),
        );
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            out.extend_from_slice(format!(".PP\n{}\n", roff_text(&about.to_string())).as_bytes());
        }
        let mut options = Vec::new();
        page.render_options_section(&mut options).unwrap();
        // One top-level section per page: the subcommand's options become
        // a subsection.
        let options = String::from_utf8(options)
            .unwrap()
            .replacen(".SH OPTIONS", ".SS Options", 1);
        out.extend_from_slice(options.as_bytes());
    }
    out.extend_from_slice(TAIL.as_bytes());
    man.render_version_section(&mut out).unwrap();
    out
}

/// Plain text as roff: backslashes escaped, no line read as a request.
fn roff_text(text: &str) -> String {
    text.replace('\\', "\\e")
        .lines()
        .map(|l| {
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const DESCRIPTION: &str = r#".SH DESCRIPTION
\fBinferdns\fR is an authoritative DNS server for one delegated zone whose
answers follow the live state of the inference endpoints behind each name:
alive, model loaded and answering, GPU load (queue depth, KV cache), the
client's location and the data residency rules of the service.
.PP
\fBinferdns run\fR is the daemon (started by systemd as \fBinferdns.service\fR);
\fBinferdns check\fR checks a configuration without serving and reports every
error as \fIfile\fR:\fIline\fR:\fIcol\fR; \fBinferdns explain\fR asks a running
daemon why a name answers what it answers; \fBinferdns demo\fR runs simulated
regions and the server on loopback.
"#;

const TAIL: &str = r#".SH FILES
.TP
\fI/etc/inferdns/inferdns.toml\fR
The main configuration: listeners, zone, GeoIP database, regions and their probes.
.TP
\fI/etc/inferdns/policies/\fR
One service per file; the file stem is the service id and its DNS label.
.TP
\fI/etc/inferdns/zones/\fR
Static records of the zone, in zone-file format.
.TP
\fI/usr/share/inferdns/test-city.mmdb\fR
The small test GeoIP database the packaged configuration points at; use a
GeoLite2 or GeoIP2 City database (kept fresh by \fBgeoipupdate\fR) in production.
.SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the configuration (as \fBsystemctl reload inferdns\fR does); a
configuration with errors is refused and the running one stays.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop: close the listeners and let queries in flight finish.
.SH "EXIT STATUS"
0 on success; 1 when the configuration is refused (\fBcheck\fR, or a
daemon that cannot start); 2 when a task of the running daemon died.
.SH "SEE ALSO"
\fBdig\fR(1), \fBsystemctl\fR(1), \fBgeoipupdate\fR(1).
The README in \fI/usr/share/doc/inferdns/\fR describes every setting.
"#;

fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "inferdns", &mut out);
    out
}

/// (file name in packaging/generated, current content)
fn generated() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("inferdns.8", man_page()),
        ("inferdns.bash", completions(Shell::Bash)),
        ("_inferdns", completions(Shell::Zsh)),
        ("inferdns.fish", completions(Shell::Fish)),
    ]
}

#[test]
fn the_man_page_and_completions_match_the_command_line() {
    let dir = generated_dir();
    let bless = std::env::var_os("BLESS").is_some();
    let mut stale = Vec::new();
    for (name, content) in generated() {
        let path = dir.join(name);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &content).unwrap();
            continue;
        }
        if std::fs::read(&path).ok().as_deref() != Some(&content[..]) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "packaging/generated/{stale:?} differ from the command line; run `BLESS=1 cargo test --test packaging` and commit them"
    );
}

#[test]
fn the_man_page_documents_every_subcommand_and_the_daemon_files() {
    let page = String::from_utf8(man_page()).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH inferdns 8"));
    for sub in Cli::command().get_subcommands() {
        if !sub.is_hide_set() {
            assert!(
                page.contains(&format!(".SH \"inferdns {}\"", sub.get_name())),
                "no section for {}",
                sub.get_name()
            );
        }
    }
    for needle in ["/etc/inferdns/inferdns.toml", "SIGHUP", "EXIT STATUS"] {
        assert!(page.contains(needle), "{needle} missing");
    }
}
