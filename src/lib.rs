//! inferdns: an authoritative DNS server for one delegated zone whose
//! answers follow the live health of inference endpoints.
//!
//! Modules by role:
//!
//! - Entry: [`cli`] (commands), [`app`] (startup order, shutdown),
//!   [`error`] (top-level errors and exit codes), [`log`].
//! - Configuration: [`config`] parses `inferdns.toml`, the policy files and
//!   the zone file, checks them (every error as file:line:col) and compiles
//!   the runtime [`config::Config`]. No sockets.
//! - Model: [`model`] holds the immutable [`model::Snapshot`] the query path
//!   reads, and the pure functions that build it.
//! - Query path: [`dns`] reads a query off the wire, answers it from one
//!   snapshot and writes the reply; it also runs the UDP and TCP listeners.
//!   Never imports config, health or admin.
//! - Signals: [`health`] probes endpoints on their own schedules and reports
//!   results; [`publish`] is the one writer that turns results into the next
//!   snapshot and swaps it in.
//! - Operations: [`admin`] serves health, status, metrics, explain, drain,
//!   reload and the log level; [`metrics`] holds the Prometheus families;
//!   [`notify`] tells systemd (`Type=notify`) about readiness, reloads and
//!   the watchdog.
//! - [`sched`]: under a real-time policy, only the UDP query threads keep
//!   it; background threads drop to SCHED_OTHER.
//! - [`demo`]: simulated inference regions and the `inferdns demo` story;
//!   the integration tests use the same regions.

pub mod admin;
pub mod app;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dns;
pub mod error;
pub mod fleet;
pub mod geo;
pub mod health;
pub mod log;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod publish;
pub mod sched;
