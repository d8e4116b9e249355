//! Command line: `inferdns run | check | demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::{self, StartOptions};
use crate::config;
use crate::demo::{self, DemoOptions};
use crate::error::AppError;

#[derive(Debug, Parser)]
#[command(
    name = "inferdns",
    version,
    about = "Authoritative DNS for AI inference endpoints"
)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::log::Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Main configuration file.
        #[arg(long, default_value = "/etc/inferdns/inferdns.toml")]
        config: PathBuf,
        /// Serve DNS (UDP and TCP) on this address instead of the config's (port 0: any free port).
        #[arg(long)]
        dns_listen: Option<SocketAddr>,
        /// Serve the admin API on this address instead of the config's (port 0: any free port).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Load and check a configuration without serving; exit 0 if it is good, 1 if not.
    Check {
        #[arg(long, default_value = "/etc/inferdns/inferdns.toml")]
        config: PathBuf,
    },
    /// Ask a running daemon why a service answers what it answers.
    Explain {
        /// The service name, e.g. chat.inference.example.com.
        #[arg(long)]
        name: String,
        /// The client (resolver) address to explain the answer for.
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// An EDNS Client Subnet to explain the answer for, e.g. 203.0.113.0/24.
        #[arg(long)]
        ecs: Option<String>,
        /// The daemon's admin API address.
        #[arg(long, default_value = "127.0.0.1:9153")]
        admin: SocketAddr,
    },
    /// Start simulated regions and the server on loopback and show failover and failback.
    Demo {
        /// One JSON object per line for each event, and a summary last.
        #[arg(long)]
        json: bool,
        /// DNS address of the demo server (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8053")]
        dns_listen: SocketAddr,
        /// Keep everything running this many seconds afterwards, for dig.
        #[arg(long, value_name = "SECONDS")]
        hold: Option<u64>,
    },
}

/// Default log filter per command: the demo prints its own story.
pub fn default_log_filter(cli: &Cli) -> &'static str {
    match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info,hickory_proto=warn",
    }
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} regions, {} endpoints, {} services, {} static records)",
                    config.display(),
                    c.regions.len(),
                    c.regions.iter().map(|r| r.endpoints.len()).sum::<usize>(),
                    c.services.len(),
                    c.zone.records.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                ExitCode::from(1)
            }
        },
        Command::Run {
            config,
            dns_listen,
            admin_listen,
        } => block_on(async move {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %config.display(),
                "Starting inferdns."
            );
            let loaded = config::load(&config)?;
            let options = StartOptions {
                dns_listen,
                admin_listen,
                config_path: Some(config),
            };
            app::run(loaded, options).await
        }),
        Command::Explain {
            name,
            client,
            ecs,
            admin,
        } => block_on(explain(name, client, ecs, admin)),
        Command::Demo {
            json,
            dns_listen,
            hold,
        } => block_on(demo::run(DemoOptions {
            json,
            dns_listen,
            hold: hold.map(Duration::from_secs),
        })),
    }
}

/// `inferdns explain`: GET /v1/explain on the running daemon, print the lines.
async fn explain(
    name: String,
    client: Option<std::net::IpAddr>,
    ecs: Option<String>,
    admin: SocketAddr,
) -> Result<(), AppError> {
    crate::health::probe::install_crypto_provider();
    let mut query = vec![("name", name)];
    query.extend(client.map(|c| ("client", c.to_string())));
    query.extend(ecs.map(|e| ("ecs", e)));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| AppError::Explain(e.to_string()))?;
    let mut url = reqwest::Url::parse(&format!("http://{admin}/v1/explain"))
        .map_err(|e| AppError::Explain(e.to_string()))?;
    url.query_pairs_mut().extend_pairs(&query);
    let response =
        http.get(url).send().await.map_err(|e| {
            AppError::Explain(format!("cannot reach the admin API at {admin}: {e}"))
        })?;
    let status = response.status();
    let body: serde_json::Value = serde_json::from_str(
        &response
            .text()
            .await
            .map_err(|e| AppError::Explain(e.to_string()))?,
    )
    .map_err(|e| AppError::Explain(format!("the admin API did not answer JSON: {e}")))?;
    if !status.is_success() {
        let reason = body["error"].as_str().unwrap_or("unknown error");
        return Err(AppError::Explain(format!("{status}: {reason}")));
    }
    for line in body["lines"].as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    Ok(())
}

fn block_on(future: impl std::future::Future<Output = Result<(), AppError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("inferdns: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                AppError::Config(errors) => {
                    for err in &errors.0 {
                        eprintln!("{err}");
                    }
                }
                other => eprintln!("inferdns: {other}"),
            }
            ExitCode::from(e.exit_code())
        }
    }
}
