//! Errors at the top of the program and their exit codes.

use std::net::SocketAddr;

use crate::config::ConfigErrors;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the probe of {endpoint}: {source}")]
    Probe {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Demo(String),
    #[error("explain: {0}")]
    Explain(String),
    #[error("status: {0}")]
    Status(String),
    #[error("{0}")]
    Geo(String),
    /// A long-lived task (publisher, reloader, GeoIP watcher, admin API,
    /// DNS listeners) ended on its own: the daemon cannot serve correctly.
    #[error("the {task} task {reason}")]
    Task { task: &'static str, reason: String },
}

impl AppError {
    /// 1 for bad configuration (as `inferdns check`, which also refuses a
    /// GeoIP database that does not load), 2 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::Geo(_) => 1,
            _ => 2,
        }
    }
}
