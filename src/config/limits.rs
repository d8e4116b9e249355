//! Checks of the limits against strangers: response rate limiting and the
//! DNS-over-TCP connection caps.

use std::time::Duration;

use toml::Spanned;

use super::check::Checker;
use super::file::{RrlSection, ServerSection};
use super::{RateLimit, Source};

/// Defaults chosen as NSD's: on, and generous enough that no real resolver
/// meets them (a resolver asks a name once per TTL).
const DEFAULT_RATE: u32 = 200;
const DEFAULT_WINDOW: Duration = Duration::from_secs(1);
const DEFAULT_SLIP: u32 = 2;
const DEFAULT_IPV4_PREFIX: u8 = 24;
const DEFAULT_IPV6_PREFIX: u8 = 56;
/// Defaults of the TCP caps.
pub(super) const DEFAULT_TCP_MAX_CONNECTIONS: u32 = 1000;
pub(super) const DEFAULT_TCP_MAX_PER_ADDRESS: u32 = 16;

impl Checker {
    /// `[rrl]`; `None` when switched off.
    pub(super) fn rrl(&mut self, src: &Source<'_>, r: &RrlSection) -> Option<RateLimit> {
        if r.enabled.as_ref().is_some_and(|e| !*e.get_ref()) {
            return None;
        }
        let rate = self.bounded(src, r.rate.as_ref(), "rrl.rate", 1, 1_000_000, DEFAULT_RATE);
        let window = match &r.window {
            Some(w) => self
                .duration(
                    src,
                    w,
                    "rrl.window",
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                )
                .unwrap_or(DEFAULT_WINDOW),
            None => DEFAULT_WINDOW,
        };
        let slip = self.bounded(src, r.slip.as_ref(), "rrl.slip", 0, 10, DEFAULT_SLIP);
        let v4 = self.bounded(
            src,
            r.ipv4_prefix.as_ref(),
            "rrl.ipv4-prefix",
            8,
            32,
            DEFAULT_IPV4_PREFIX,
        );
        let v6 = self.bounded(
            src,
            r.ipv6_prefix.as_ref(),
            "rrl.ipv6-prefix",
            16,
            128,
            DEFAULT_IPV6_PREFIX,
        );
        let exempt = match &r.exempt {
            Some(list) => self.networks(src, list),
            None => vec![
                "127.0.0.0/8".parse().expect("a literal network"),
                "::1/128".parse().expect("a literal network"),
            ],
        };
        Some(RateLimit {
            rate: f64::from(rate),
            burst: f64::from(rate) * window.as_secs_f64(),
            slip,
            ipv4_prefix: v4,
            ipv6_prefix: v6,
            exempt,
        })
    }

    /// The TCP caps: (in all, per address).
    pub(super) fn tcp_caps(&mut self, src: &Source<'_>, s: &ServerSection) -> (u32, u32) {
        let all = self.bounded(
            src,
            s.tcp_max_connections.as_ref(),
            "tcp-max-connections",
            1,
            1_000_000,
            DEFAULT_TCP_MAX_CONNECTIONS,
        );
        let per_address = self.bounded(
            src,
            s.tcp_max_per_address.as_ref(),
            "tcp-max-per-address",
            1,
            all,
            DEFAULT_TCP_MAX_PER_ADDRESS.min(all),
        );
        (all, per_address)
    }

    /// A number in `min..=max`, or an error at its position and `default`.
    pub(super) fn bounded<T>(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<T>>,
        what: &str,
        min: T,
        max: T,
        default: T,
    ) -> T
    where
        T: Copy + PartialOrd + std::fmt::Display,
    {
        match v {
            Some(v) if *v.get_ref() < min || *v.get_ref() > max => {
                self.err(
                    src,
                    v.span(),
                    format!("{what} {} is out of range ({min}..={max})", v.get_ref()),
                );
                default
            }
            Some(v) => *v.get_ref(),
            None => default,
        }
    }

    /// Networks (`192.0.2.0/24`) or single addresses.
    pub(super) fn networks(
        &mut self,
        src: &Source<'_>,
        list: &[Spanned<String>],
    ) -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for net in list {
            match net.get_ref().parse::<ipnet::IpNet>() {
                Ok(n) => out.push(n.trunc()),
                Err(_) => match net.get_ref().parse::<std::net::IpAddr>() {
                    Ok(ip) => out.push(ipnet::IpNet::from(ip)),
                    Err(_) => self.err(
                        src,
                        net.span(),
                        format!(
                            "{:?} is not a network like 192.0.2.0/24 or an address",
                            net.get_ref()
                        ),
                    ),
                },
            }
        }
        out
    }
}
