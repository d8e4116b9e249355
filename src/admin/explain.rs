//! `GET /v1/explain?name=…&client=…[&ecs=…]`: the same explanation that
//! `dig TXT _explain.<service>` gives, for any client address. `name` is a
//! service's DNS name or its id.

use std::net::IpAddr;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use hickory_proto::rr::{LowerName, Name};
use serde::Deserialize;
use serde_json::json;

use super::{AdminState, error};
use crate::dns::answer::{Client, explain_lines, service_index};

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    /// The service name, with or without the trailing dot, or its id.
    pub name: String,
    /// The client (resolver) address the question is asked for.
    pub client: Option<String>,
    /// An EDNS Client Subnet, like `203.0.113.0/24`.
    pub ecs: Option<String>,
}

pub async fn explain(State(state): State<AdminState>, Query(q): Query<ExplainQuery>) -> Response {
    let snap = state.snapshot.load_full();
    // A service id (`chat`) names its service, whatever its DNS name.
    let by_id = snap
        .service_views
        .iter()
        .find(|v| v.id == q.name)
        .map(|v| v.name.clone());
    let Ok(mut name) = Name::from_ascii(by_id.as_deref().unwrap_or(&q.name)) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a DNS name", q.name),
        );
    };
    name.set_fqdn(true);
    let client = match q.client.as_deref().map(str::parse::<IpAddr>) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "client {:?} is not an IP address",
                    q.client.unwrap_or_default()
                ),
            );
        }
    };
    let ecs = match q.ecs.as_deref().map(str::parse::<ipnet::IpNet>) {
        None => None,
        Some(Ok(net)) => Some(net.trunc()),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "ecs {:?} is not a network like 203.0.113.0/24",
                    q.ecs.unwrap_or_default()
                ),
            );
        }
    };
    let Some(service) = service_index(&snap, &LowerName::new(&name)) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("{name} is not a service name"),
        );
    };
    let client = Client { addr: client, ecs };
    let lines = explain_lines(&snap, service, &client);
    (
        StatusCode::OK,
        Json(json!({ "name": name.to_string(), "generation": snap.generation, "lines": lines })),
    )
        .into_response()
}
