//! Logging: plain text on stderr by default (journald adds time and unit),
//! JSON on request; the filter comes from `RUST_LOG` or the command's
//! default and can be changed at runtime (admin `POST /v1/log-level`).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
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

pub fn init(default_filter: &str, format: Format) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let done = match format {
        Format::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_target(false))
            .try_init(),
        Format::Json => registry
            .with(
                fmt::layer()
                    .json()
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
    use super::parse_filter;

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
