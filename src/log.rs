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

/// Replaces the log filter (`debug`, `info,inferdns=debug`, …).
pub fn set_filter(filter: &str) -> Result<(), String> {
    let parsed =
        EnvFilter::try_new(filter).map_err(|e| format!("{filter:?} is not a log filter: {e}"))?;
    let handle = FILTER
        .get()
        .ok_or("logging was not initialised by this process")?;
    handle.reload(parsed).map_err(|e| e.to_string())?;
    tracing::info!(filter, "Log filter changed.");
    Ok(())
}
