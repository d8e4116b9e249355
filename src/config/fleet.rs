//! Checks of `[fleet]`: the peers, their token, and the quorum rule.

use std::collections::HashSet;
use std::time::Duration;

use hickory_proto::rr::Name;

use super::check::Checker;
use super::file::FleetSection;
use super::{Fleet, Peer, ServerConfig, Source};
use crate::fleet::{Quorum, seed_of};

/// Where a peer serves its observations, below its admin URL.
pub const OBSERVATIONS_PATH: &str = "/v1/fleet/observations";

impl Checker {
    /// `[fleet]`, with its defaults; `None` after an error in it.
    pub(super) fn fleet(
        &mut self,
        src: &Source<'_>,
        f: &FleetSection,
        server: Option<&ServerConfig>,
        apex: Option<&Name>,
    ) -> Option<Fleet> {
        let errors = self.errors.len();
        let d = Fleet::default();
        let edge = match &f.edge {
            Some(e) if e.get_ref().trim().is_empty() => {
                self.err(src, e.span(), "fleet.edge cannot be empty");
                String::new()
            }
            Some(e) => e.get_ref().clone(),
            None => server.map(|s| s.nsid.clone()).unwrap_or_default(),
        };
        let mut names = HashSet::from([edge.clone()]);
        let mut peers = Vec::new();
        for p in &f.peers {
            let p = p.get_ref();
            let name = p.name.get_ref();
            if name.trim().is_empty() || !names.insert(name.clone()) {
                self.err(
                    src,
                    p.name.span(),
                    format!("fleet peer name {name:?} is empty, this edge's own, or used twice"),
                );
            }
            let url = p.url.get_ref().trim_end_matches('/');
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => self.err(
                    src,
                    p.url.span(),
                    format!("fleet peer url {url:?} is not an http:// or https:// URL with a host"),
                ),
            }
            peers.push(Peer {
                name: name.clone(),
                url: format!("{url}{OBSERVATIONS_PATH}"),
            });
        }
        let token = f
            .token_file
            .as_ref()
            .and_then(|file| self.secret_file(src, file, "fleet token"));
        if !peers.is_empty() && f.token_file.is_none() {
            self.err(
                src,
                f.peers[0].span(),
                "fleet peers need fleet.token-file: every edge sends the token and requires it",
            );
        }
        let ca_pem = f.ca_file.as_ref().and_then(|file| self.ca_file(src, file));
        let interval = f
            .pull_interval
            .as_ref()
            .map_or(Some(d.pull_interval), |v| {
                self.duration(
                    src,
                    v,
                    "fleet.pull-interval",
                    Duration::from_millis(100),
                    Duration::from_secs(60),
                )
            })
            .unwrap_or(d.pull_interval);
        let timeout = f.pull_timeout.as_ref().map_or(Some(interval / 2), |v| {
            self.duration(
                src,
                v,
                "fleet.pull-timeout",
                Duration::from_millis(10),
                interval,
            )
        });
        let expiry = f.expiry.as_ref().map_or(Some(interval * 3), |v| {
            self.duration(src, v, "fleet.expiry", interval, Duration::from_secs(600))
        });
        let quorum = match &f.quorum {
            None => Quorum::Local,
            Some(q) => match Quorum::parse(q.get_ref(), peers.len() + 1) {
                Ok(q) => q,
                Err(why) => {
                    self.err(src, q.span(), why);
                    Quorum::Local
                }
            },
        };
        if quorum != Quorum::Local
            && peers.is_empty()
            && let Some(q) = &f.quorum
        {
            self.err(
                src,
                q.span(),
                "a fleet quorum needs [[fleet.peers]]: alone, this edge's view is the only one",
            );
        }
        let seed = match (&f.seed, apex) {
            (Some(s), _) => s.get_ref().clone(),
            (None, Some(apex)) => apex.to_ascii(),
            (None, None) => String::new(),
        };
        (self.errors.len() == errors).then(|| Fleet {
            edge,
            seed: (!peers.is_empty()).then(|| seed_of(&seed)),
            peers,
            token,
            ca_pem,
            pull_interval: interval,
            pull_timeout: timeout.unwrap_or(interval / 2),
            expiry: expiry.unwrap_or(interval * 3),
            quorum,
        })
    }
}
