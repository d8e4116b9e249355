//! The demo's later acts: criticality under a load rise (read beside the
//! capacity act) and a model-version rollout (canary share, automatic
//! rollback, promotion by the admin API).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use serde_json::json;
use tokio::time::Instant;

use super::{
    CANARY_IP, CANARY_MODEL, MODEL, PRIMARY_IP, Printer, STEP_DEADLINE, ask_subnet, client,
};
use crate::demo::{Fault, SimRegion};
use crate::error::AppError;

/// The demo's critical and sheddable capacity names.
pub const VIP_SERVICE: &str = "vip.inference.example.com.";
pub const BULK_SERVICE: &str = "bulk.inference.example.com.";
/// The demo's rolling-out name.
pub const ROLLOUT_SERVICE: &str = "rollout.inference.example.com.";

/// Share of `n` answers of `name` that went to us-east.
pub async fn share_of_east(dns: SocketAddr, name: &str, n: u32) -> Result<f64, AppError> {
    let ask = client::Ask::new(name, RecordType::A);
    let mut east = 0;
    for _ in 0..n {
        let m = client::query_udp(dns, &ask).await?;
        east += u32::from(client::answer_strings(&m) == [PRIMARY_IP.to_string()]);
    }
    Ok(f64::from(east) / f64::from(n))
}

/// What the rollout act measured.
pub struct RolloutFigures {
    /// Share of the client subnets answered with the canary.
    pub share: f64,
    /// Seconds from the canary's first empty completion until none of its
    /// subnets got it.
    pub rollback_s: f64,
    /// Share on the canary version once promoted.
    pub promoted_share: f64,
}

/// 2,000 client /24s, as ECS.
fn subnets() -> Vec<String> {
    (0..2000)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 250, i % 250))
        .collect()
}

/// The subnets among `subnets` answered with the canary.
async fn on_canary(dns: SocketAddr, subnets: &[String]) -> Result<Vec<String>, AppError> {
    let mut out = Vec::new();
    for s in subnets {
        if ask_subnet(dns, ROLLOUT_SERVICE, s).await?.0 == [CANARY_IP.to_string()] {
            out.push(s.clone());
        }
    }
    Ok(out)
}

/// Waits until status shows the rollout's canary region fit again.
async fn wait_canary_fit(admin: SocketAddr) -> Result<(), AppError> {
    let fit = |s: &serde_json::Value| {
        s["services"].as_array().is_some_and(|services| {
            services.iter().any(|v| {
                v["id"] == "rollout"
                    && v["rollout"]["canary_regions"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty())
            })
        })
    };
    super::wait_status(admin, fit, "the canary fit again").await
}

async fn admin_post(admin: SocketAddr, path: &str, token: &str) -> Result<(), AppError> {
    crate::health::probe::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| AppError::Demo(e.to_string()))?;
    let response = http
        .post(format!("http://{admin}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| AppError::Demo(format!("POST {path}: {e}")))?;
    if !response.status().is_success() {
        return Err(AppError::Demo(format!(
            "POST {path}: {}",
            response.status()
        )));
    }
    Ok(())
}

/// us-central serves the next version: 5 % of client subnets get it; its
/// completions go empty and it loses them; healed, an operator promotes it.
pub(super) async fn rollout(
    p: &Printer,
    dns: SocketAddr,
    admin: SocketAddr,
    canary: &SimRegion,
    token: &str,
) -> Result<RolloutFigures, AppError> {
    let all = subnets();
    // Until the canary's first probes are in, its subnets get the stable version.
    let deadline = Instant::now() + STEP_DEADLINE;
    let mut on = on_canary(dns, &all).await?;
    while on.is_empty() {
        if Instant::now() > deadline {
            return Err(AppError::Demo("the canary never took its share".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        on = on_canary(dns, &all).await?;
    }
    let share = on.len() as f64 / all.len() as f64;
    p.event(
        json!({"event": "rollout", "stable": MODEL, "canary": CANARY_MODEL, "canary_subnets": on.len(), "subnets": all.len()}),
        format!(
            "{ROLLOUT_SERVICE} {CANARY_MODEL} on us-central answers {} of {} client subnets ({:.1}%, 5% asked; each subnet keeps its version)",
            on.len(),
            all.len(),
            share * 100.0
        ),
    );
    let broke = Instant::now();
    canary.set_fault(Fault::EmptyCompletion);
    p.event(
        json!({"event": "fault", "region": "us-central", "fault": Fault::EmptyCompletion.name()}),
        "us-central's completions come back empty".to_string(),
    );
    loop {
        if on_canary(dns, &on).await?.is_empty() {
            break;
        }
        if broke.elapsed() > STEP_DEADLINE {
            return Err(AppError::Demo("the canary was never rolled back".into()));
        }
    }
    let rollback_s = broke.elapsed().as_secs_f64();
    p.event(
        json!({"event": "rollback", "seconds": super::round3(rollback_s)}),
        format!(
            "{ROLLOUT_SERVICE} canary rolled back: its {} subnets are on {MODEL} again after {rollback_s:.2} s",
            on.len()
        ),
    );
    canary.set_fault(Fault::None);
    // Healed, it stays rolled back; once it is fit again, an operator promotes it.
    wait_canary_fit(admin).await?;
    admin_post(admin, "/v1/services/rollout/promote", token).await?;
    // Promoted: every subnet on the new version once it answers again.
    let sample: Vec<String> = all.iter().step_by(10).cloned().collect();
    let deadline = Instant::now() + STEP_DEADLINE;
    let promoted = loop {
        let n = on_canary(dns, &sample).await?.len();
        if n == sample.len() || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let promoted_share = promoted as f64 / sample.len() as f64;
    p.event(
        json!({"event": "promoted", "share": super::round3(promoted_share)}),
        format!(
            "POST /v1/services/rollout/promote -> {:.0}% of client subnets on {CANARY_MODEL}",
            promoted_share * 100.0
        ),
    );
    Ok(RolloutFigures {
        share,
        rollback_s,
        promoted_share,
    })
}
