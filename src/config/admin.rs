//! Checks of the admin API keys of `[server]`: who may reach it and what
//! one client may hold.

use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::check::Checker;
use super::file::ServerSection;
use super::{AdminLimits, Source};

/// Defaults: enough for a few scrapers and operators, small enough that a
/// slow client holds little.
pub(super) const DEFAULT_ADMIN_LIMITS: AdminLimits = AdminLimits {
    max_connections: 64,
    header_timeout: Duration::from_secs(5),
    body_timeout: Duration::from_secs(10),
    max_header_bytes: 16 * 1024,
};

/// hyper reads a request head into a buffer no smaller than this.
const MIN_HEADER_BYTES: u32 = 8 * 1024;

impl Checker {
    /// The admin keys of `[server]`: whether the read routes need the
    /// token, and the connection limits. A non-loopback `admin-listen`
    /// without a token file is refused: anyone who can reach it could read
    /// the whole routing state, and nobody could be told apart.
    pub(super) fn admin(
        &mut self,
        src: &Source<'_>,
        s: &ServerSection,
        admin_listen: Option<SocketAddr>,
    ) -> (bool, AdminLimits) {
        let has_token = s.admin_token_file.is_some();
        if let Some(addr) = admin_listen
            && !addr.ip().to_canonical().is_loopback()
            && !has_token
        {
            self.err(
                src,
                s.admin_listen.span(),
                format!(
                    "admin-listen {addr} is not a loopback address: set admin-token-file \
                     (and consider admin-token-for-reads) before exposing the admin API"
                ),
            );
        }
        let for_reads = s.admin_token_for_reads.as_ref();
        if let Some(v) = for_reads
            && *v.get_ref()
            && !has_token
        {
            self.err(
                src,
                v.span(),
                "admin-token-for-reads needs admin-token-file",
            );
        }
        let d = DEFAULT_ADMIN_LIMITS;
        let limits = AdminLimits {
            max_connections: self.admin_number(
                src,
                s.admin_max_connections.as_ref(),
                "admin-max-connections",
                1..=10_000,
                d.max_connections,
            ),
            header_timeout: self.admin_duration(
                src,
                s.admin_header_timeout.as_ref(),
                "admin-header-timeout",
                d.header_timeout,
            ),
            body_timeout: self.admin_duration(
                src,
                s.admin_body_timeout.as_ref(),
                "admin-body-timeout",
                d.body_timeout,
            ),
            max_header_bytes: self.admin_number(
                src,
                s.admin_max_header_bytes.as_ref(),
                "admin-max-header-bytes",
                MIN_HEADER_BYTES..=1024 * 1024,
                d.max_header_bytes,
            ),
        };
        (for_reads.is_some_and(|v| *v.get_ref()), limits)
    }

    fn admin_number(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<u32>>,
        what: &str,
        range: std::ops::RangeInclusive<u32>,
        default: u32,
    ) -> u32 {
        match v {
            None => default,
            Some(v) if range.contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                self.err(
                    src,
                    v.span(),
                    format!(
                        "{what} {} is out of range ({}..={})",
                        v.get_ref(),
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn admin_duration(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<String>>,
        what: &str,
        default: Duration,
    ) -> Duration {
        v.and_then(|v| {
            self.duration(
                src,
                v,
                what,
                Duration::from_millis(100),
                Duration::from_secs(300),
            )
        })
        .unwrap_or(default)
    }
}
