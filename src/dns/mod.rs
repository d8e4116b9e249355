//! The query path.
//!
//! Owns: turning one DNS question into a response from the current
//! [`crate::model::Snapshot`]. Reads the snapshot only: never imports
//! `config`, `health` or `admin`, never does I/O besides writing the
//! response, never logs above DEBUG.

pub mod answer;
mod handler;
mod mmsg;
pub mod query;
pub mod reply;
pub mod rrl;
pub mod wire;

pub use handler::{DnsServer, Handler, TcpLimits, Transport};
