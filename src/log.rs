//! Logging on stderr, in the form its reader wants:
//!
//! - connected to the journal (`$JOURNAL_STREAM` names stderr's device and
//!   inode): plain lines with a `<N>` syslog priority prefix (ERROR 3,
//!   WARN 4, INFO 6, DEBUG and TRACE 7), no colours, no timestamps
//!   (journald adds time, unit and priority: `journalctl -p warning`);
//! - a terminal: timestamps and colours;
//! - a file or a pipe: timestamps, no colours;
//! - `--log-format json`: one JSON object per line, whatever stderr is.
//!
//! The filter comes from `RUST_LOG` or the command's default and can be
//! changed at runtime (admin `POST /v1/log-level`).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where stderr goes, as far as text lines care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// systemd connected stderr to the journal.
    Journal,
    /// A terminal: colours.
    Terminal,
    /// A file or a pipe: neither colours nor priority prefixes.
    Plain,
}

impl Sink {
    /// What this process's stderr is.
    pub fn of_stderr() -> Self {
        let stderr = std::io::stderr();
        if let Some(stream) = std::env::var_os("JOURNAL_STREAM")
            && let Some((dev, ino)) = fd_identity(&stderr)
            && journal_stream_is(&stream.to_string_lossy(), dev, ino)
        {
            return Sink::Journal;
        }
        if stderr.is_terminal() {
            Sink::Terminal
        } else {
            Sink::Plain
        }
    }
}

/// The device and inode of an open descriptor (via a duplicate: std has
/// no fstat on a borrowed descriptor).
fn fd_identity(fd: &impl std::os::fd::AsFd) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let owned = fd.as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(owned).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether `$JOURNAL_STREAM` (`DEVICE:INODE`, both decimal) names the file
/// with `dev` and `ino`. systemd.exec(5): a process whose stderr was
/// redirected elsewhere inherits the variable, hence the comparison.
pub fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The syslog priority journald files a line under (`sd-daemon(3)`).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Text lines for the journal: `<N>` first, then the usual line without
/// time and colours.
struct JournalFormat(format::Format<format::Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

pub fn init(default_filter: &str, format: Format) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let text = fmt::layer().with_writer(std::io::stderr).with_target(false);
    let done = match (format, Sink::of_stderr()) {
        (Format::Text, Sink::Journal) => registry
            .with(
                text.with_ansi(false).event_format(JournalFormat(
                    fmt::format()
                        .without_time()
                        .with_target(false)
                        .with_ansi(false),
                )),
            )
            .try_init(),
        (Format::Text, sink) => registry
            .with(text.with_ansi(sink == Sink::Terminal))
            .try_init(),
        (Format::Json, _) => registry
            .with(
                fmt::layer()
                    .json()
                    .with_ansi(false)
                    .with_writer(std::io::stderr)
                    .with_current_span(false),
            )
            .try_init(),
    };
    // A second init (tests start several servers in one process) keeps the first.
    if done.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Why a new filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The text is not a filter we accept; the old filter stays.
    #[error("{0}")]
    Invalid(String),
    /// This process did not set up logging (a library user, a test).
    #[error("logging was not initialised by this process")]
    NotInitialised,
}

/// Level names a directive may end with (any case).
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks one directive: `LEVEL`, `target=LEVEL` or
/// `target[span{field=value}]=LEVEL`. EnvFilter alone accepts a bare word
/// such as `infoo` as a *target* with no level, which silences every other
/// line; here every directive must name a level.
fn check_directive(directive: &str) -> Result<(), String> {
    let is_level = |text: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(text));
    let Some((selector, level)) = directive.rsplit_once('=') else {
        return if is_level(directive) {
            Ok(())
        } else {
            Err(format!(
                "{directive:?} is not a level (one of {}) nor target=level",
                LEVELS.join(", ")
            ))
        };
    };
    if !is_level(level.trim()) {
        return Err(format!(
            "{level:?} in {directive:?} is not a level (one of {})",
            LEVELS.join(", ")
        ));
    }
    let (target, span) = match selector.find('[') {
        Some(at) => (&selector[..at], Some(&selector[at..])),
        None => (selector, None),
    };
    let target_ok = target
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'));
    if !target_ok || (target.is_empty() && span.is_none()) {
        return Err(format!("{selector:?} in {directive:?} is not a target"));
    }
    if span.is_some_and(|s| !s.ends_with(']')) {
        return Err(format!(
            "{selector:?} in {directive:?} has an unclosed span filter"
        ));
    }
    Ok(())
}

/// Parses a filter strictly: comma-separated directives, each with a level.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    if filter.trim().is_empty() {
        return Err("the log filter is empty".into());
    }
    for directive in filter.split(',') {
        check_directive(directive.trim())
            .map_err(|e| format!("{filter:?} is not a log filter: {e}"))?;
    }
    EnvFilter::try_new(filter).map_err(|e| format!("{filter:?} is not a log filter: {e}"))
}

/// Replaces the log filter (`debug`, `info,inferdns=debug`, …). An invalid
/// filter is refused and the one in force stays.
pub fn set_filter(filter: &str) -> Result<(), FilterError> {
    let parsed = parse_filter(filter).map_err(FilterError::Invalid)?;
    let handle = FILTER.get().ok_or(FilterError::NotInitialised)?;
    handle
        .reload(parsed)
        .map_err(|e| FilterError::Invalid(e.to_string()))?;
    tracing::info!(filter, "Log filter changed.");
    Ok(())
}

/// The filter in force, if this process set up logging.
pub fn current_filter() -> Option<String> {
    FILTER.get()?.with_current(ToString::to_string).ok()
}

#[cfg(test)]
mod tests {
    use super::{journal_stream_is, parse_filter};

    #[test]
    fn journal_stream_must_name_this_very_file() {
        assert!(journal_stream_is("8:12345", 8, 12345));
        assert!(journal_stream_is("8:12345\n", 8, 12345));
        assert!(!journal_stream_is("8:12346", 8, 12345));
        assert!(!journal_stream_is("9:12345", 8, 12345));
        assert!(!journal_stream_is("8", 8, 12345));
        assert!(!journal_stream_is("", 8, 12345));
        assert!(!journal_stream_is("x:y", 8, 12345));
    }

    #[test]
    fn stderr_redirected_to_another_file_is_not_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let a = std::fs::File::create(dir.path().join("a")).unwrap();
        let b = std::fs::File::create(dir.path().join("b")).unwrap();
        let (dev, ino) = super::fd_identity(&a).unwrap();
        let (dev_b, ino_b) = super::fd_identity(&b).unwrap();
        let stream = format!("{dev}:{ino}");
        assert!(journal_stream_is(&stream, dev, ino));
        assert!(!journal_stream_is(&stream, dev_b, ino_b));
    }

    #[test]
    fn every_directive_must_name_a_level() {
        for good in [
            "info",
            "WARN",
            "info,inferdns=debug",
            "warn,hickory_server=error",
            "inferdns::health=trace",
            "inferdns[probe{endpoint=x}]=debug",
            "off",
        ] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
        for bad in [
            "infoo",
            "",
            " ",
            "info,",
            "inferdns=infoo",
            "inferdns",
            "info,inferdns",
            "=debug",
            "in ferdns=debug",
            "inferdns[span=debug",
            "[[[nonsense",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad:?} accepted");
        }
    }
}
