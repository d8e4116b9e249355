//! The client side of the admin API: `inferdns status` and `inferdns
//! explain` ask a running daemon and print what it says.
//!
//! Owns: finding the daemon (the `--admin` flag, else `[server]
//! admin-listen` of the config file, with its token when the read routes
//! need one), one GET with a timeout, and the status table. Never prints
//! the token.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::config::{self, Secret};

/// Where the daemon's admin API is, and the token its read routes need.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    pub addr: SocketAddr,
    pub token: Option<Secret>,
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("cannot reach the admin API at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the admin API at {addr} did not answer JSON: {reason}")]
    NotJson { addr: SocketAddr, reason: String },
    /// The daemon refused the request: HTTP status and its reason.
    #[error("{status}: {reason}")]
    Refused { status: u16, reason: String },
}

impl AdminTarget {
    /// `admin` when given (with the token of `config_path` if that was
    /// given too), else the address and token of the config file.
    pub fn find(
        admin: Option<SocketAddr>,
        config_path: Option<&Path>,
        default_config: &Path,
    ) -> Result<AdminTarget, ClientError> {
        let path = match (admin, config_path) {
            (Some(addr), None) => return Ok(AdminTarget { addr, token: None }),
            (_, Some(path)) => path,
            (None, None) => default_config,
        };
        let config = config::load(path)?;
        let server = &config.server;
        Ok(AdminTarget {
            addr: admin.unwrap_or_else(|| reachable(server.admin_listen)),
            token: server
                .admin_token_for_reads
                .then(|| server.admin_token.clone())
                .flatten(),
        })
    }

    /// GET `path` with `query`; the JSON body of a success.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        crate::health::probe::install_crypto_provider();
        let addr = self.addr;
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            addr,
            reason: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(unreachable)?;
        let mut url = reqwest::Url::parse(&format!("http://{addr}{path}")).map_err(|e| {
            ClientError::Unreachable {
                addr,
                reason: e.to_string(),
            }
        })?;
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut request = http.get(url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(&token.0);
        }
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let body: Value = serde_json::from_str(&text).map_err(|e| ClientError::NotJson {
            addr,
            reason: e.to_string(),
        })?;
        if !status.is_success() {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                reason: body["error"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_string(),
            });
        }
        Ok(body)
    }
}

/// A listening address to connect to: the unspecified address (listening
/// on all) is reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Text of a JSON string or number; `-` for null or missing.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A decision of `/v1/status` in words: `tier 0`, `fail-open`, `nodata`,
/// `last-known-good tier 0 (12 s left, then fail-open)`, `fallback to chat`.
pub fn decision_text(d: &Value) -> String {
    let state = d["state"].as_str().unwrap_or("?");
    match state {
        "tier" => format!("tier {}", text(&d["tier"])),
        "last-known-good" => format!(
            "last-known-good tier {} ({} s left, then {})",
            text(&d["tier"]),
            d["hold_left_ms"].as_u64().unwrap_or(0).div_ceil(1000),
            text(&d["then"])
        ),
        "fallback" => format!("fallback to {}", text(&d["service"])),
        // As dig and the metrics say them.
        "no-data" => "nodata".to_string(),
        "serv-fail" => "servfail".to_string(),
        "residency-no-data" => "residency nodata".to_string(),
        other => other.to_string(),
    }
}

/// `primary 75%, secondary 25%`.
fn shares(regions: &Value) -> String {
    let parts: Vec<String> = regions
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} {:.0}%",
                text(&r["region"]),
                r["share"].as_f64().unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

/// Space-aligned columns under a header row.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(ToString::to_string).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The layers of an endpoint in probe order: `alive up, models down`.
fn layers(e: &Value) -> String {
    let parts: Vec<String> = ["alive", "models", "completion"]
        .iter()
        .filter_map(|l| e["layers"].get(*l).map(|s| format!("{l} {}", text(s))))
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

/// The fleet line and its peers' table, when the edge has peers.
fn fleet_lines(out: &mut String, f: &Value) {
    if !f.is_object() {
        return;
    }
    let _ = writeln!(
        out,
        "fleet: edge {}, quorum {}, {} of {} edges fresh ({})",
        text(&f["edge"]),
        text(&f["quorum"]),
        text(&f["fresh"]),
        text(&f["edges"]),
        text(&f["state"]),
    );
    out.push('\n');
    let peers: Vec<Vec<String>> = f["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["name"]),
                if p["fresh"].as_bool() == Some(true) {
                    "yes".to_string()
                } else {
                    "no".to_string()
                },
                p["age_s"]
                    .as_f64()
                    .map_or("never".to_string(), |a| format!("{a:.1} s")),
                if p["last_error"].is_string() {
                    text(&p["last_error"])
                } else {
                    "-".to_string()
                },
            ]
        })
        .collect();
    table(out, &["PEER", "FRESH", "LAST PULL", "LAST ERROR"], &peers);
    out.push('\n');
}

/// The tables of `inferdns status` from the JSON of `GET /v1/status`:
/// regions, endpoints, services (and their residency classes).
pub fn render_status(s: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "inferdns {}, {}, snapshot generation {} ({:.1} s old)",
        text(&s["version"]),
        if s["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "starting"
        },
        text(&s["snapshot"]["generation"]),
        s["snapshot"]["age_s"].as_f64().unwrap_or(0.0),
    );
    out.push('\n');
    fleet_lines(&mut out, &s["fleet"]);
    let regions: Vec<Vec<String>> = s["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                text(&r["id"]),
                format!("{}/{}", text(&r["endpoints_up"]), text(&r["endpoints"])),
                if r["drained"].as_bool() == Some(true) {
                    "yes".to_string()
                } else {
                    "no".to_string()
                },
                r["utilization"]
                    .as_f64()
                    .map_or("-".to_string(), |u| format!("{:.0}%", u * 100.0)),
                text(&r["gpus"]),
            ]
        })
        .collect();
    table(
        &mut out,
        &["REGION", "UP", "DRAINED", "UTILISATION", "GPUS"],
        &regions,
    );
    out.push('\n');
    let endpoints: Vec<Vec<String>> = s["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let mut state = text(&e["status"]);
            for (flag, word) in [("drained", "drained"), ("cooling", "cooling")] {
                if e[flag].as_bool() == Some(true) {
                    let _ = write!(state, " ({word})");
                }
            }
            let q = &e["quorum"];
            if q.is_object() {
                let _ = match q["local_fallback"].as_bool() {
                    Some(true) => write!(state, " (own view)"),
                    _ => write!(state, " ({}/{} up)", text(&q["up"]), text(&q["voters"])),
                };
            }
            let error = [&e["silent"], &e["last_error"], &e["skipped"]]
                .into_iter()
                .find(|v| v.is_string())
                .map_or("-".to_string(), text);
            vec![
                text(&e["region"]),
                text(&e["target"]),
                state,
                layers(e),
                e["latency_ms"]
                    .as_f64()
                    .map_or("-".to_string(), |ms| format!("{ms:.0} ms")),
                error,
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "REGION",
            "ENDPOINT",
            "STATE",
            "LAYERS",
            "LATENCY",
            "LAST ERROR",
        ],
        &endpoints,
    );
    out.push('\n');
    let mut services = Vec::new();
    for v in s["services"].as_array().into_iter().flatten() {
        services.push(vec![
            text(&v["id"]),
            text(&v["name"]),
            "everyone".to_string(),
            decision_text(&v["decision"]),
            shares(&v["regions"]),
        ]);
        for class in v["residency"].as_array().into_iter().flatten() {
            services.push(vec![
                String::new(),
                String::new(),
                text(&class["clients"]),
                decision_text(&class["decision"]),
                shares(&class["regions"]),
            ]);
        }
        if let Some(row) = services.iter_mut().rev().find(|r| r[2] == "everyone")
            && v["residency"].is_array()
        {
            // With residency rules the unrestricted row is the "otherwise" class.
            row[2] = "others".to_string();
        }
    }
    table(
        &mut out,
        &["SERVICE", "NAME", "CLIENTS", "DECISION", "SHARES"],
        &services,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_status_table_has_a_row_per_region_endpoint_and_service() {
        let status = json!({
            "version": "0.1.0", "ready": true,
            "snapshot": {"generation": 7, "age_s": 0.25},
            "regions": [
                {"id": "primary", "drained": false, "endpoints": 1, "endpoints_up": 1, "utilization": 0.5, "gpus": 8.0},
                {"id": "dead", "drained": true, "endpoints": 1, "endpoints_up": 0},
            ],
            "endpoints": [
                {"region": "primary", "target": "192.0.2.1", "status": "up", "layers": {"alive": "up", "models": "up"}, "latency_ms": 12.4, "last_error": null},
                {"region": "dead", "target": "192.0.2.2", "status": "down", "drained": true, "layers": {"alive": "down"}, "last_error": "connection refused"},
                {"region": "dead", "target": "192.0.2.3", "status": "up", "layers": {"alive": "down"},
                 "quorum": {"up": 2, "voters": 3, "local_fallback": false}, "last_error": "quorum majority: 2 of 3 vantage points see it up (this edge: down)"},
            ],
            "fleet": {"edge": "edge-a", "quorum": "majority", "fresh": 2, "edges": 3, "state": "degraded",
                      "peers": [{"name": "edge-b", "fresh": true, "age_s": 0.4},
                                {"name": "edge-c", "fresh": false, "age_s": 9.0, "last_error": "HTTP 503"}]},
            "services": [
                {"id": "chat", "name": "chat.example.", "decision": {"state": "tier", "tier": 0},
                 "regions": [{"region": "primary", "share": 1.0}]},
                {"id": "eu", "name": "eu.example.", "decision": {"state": "fail-open"}, "regions": [],
                 "residency": [{"clients": "EU", "allowed": "dead", "decision": {"state": "residency-no-data"}, "regions": []}]},
            ],
        });
        let text = render_status(&status);
        let rows: Vec<String> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert!(rows[0].contains("ready, snapshot generation 7"), "{text}");
        for row in [
            "REGION UP DRAINED UTILISATION GPUS",
            "primary 1/1 no 50% 8.0",
            "dead 0/1 yes - -",
            "REGION ENDPOINT STATE LAYERS LATENCY LAST ERROR",
            "primary 192.0.2.1 up alive up, models up 12 ms -",
            "dead 192.0.2.2 down (drained) alive down - connection refused",
            "dead 192.0.2.3 up (2/3 up) alive down - quorum majority: 2 of 3 vantage points see it up (this edge: down)",
            "fleet: edge edge-a, quorum majority, 2 of 3 edges fresh (degraded)",
            "PEER FRESH LAST PULL LAST ERROR",
            "edge-b yes 0.4 s -",
            "edge-c no 9.0 s HTTP 503",
            "SERVICE NAME CLIENTS DECISION SHARES",
            "chat chat.example. everyone tier 0 primary 100%",
            "eu eu.example. others fail-open -",
            // A row per residency class, under its service.
            "EU residency nodata -",
        ] {
            assert!(rows.iter().any(|r| r == row), "no row {row:?} in\n{text}");
        }
    }

    #[test]
    fn listening_on_all_addresses_is_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9153".parse().unwrap()),
            "127.0.0.1:9153".parse().unwrap()
        );
        assert_eq!(
            reachable("[::]:9153".parse().unwrap()),
            "[::1]:9153".parse().unwrap()
        );
        assert_eq!(
            reachable("192.0.2.1:9153".parse().unwrap()),
            "192.0.2.1:9153".parse().unwrap()
        );
    }
}
