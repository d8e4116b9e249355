//! Command line: `inferdns run | check | status | explain | demo`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::admin::client::{self, AdminTarget};

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
    /// Show a running daemon's regions, endpoints and service decisions.
    Status {
        /// The daemon's admin API address [default: `[server] admin-listen` of --config].
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// The daemon's configuration file, for its admin address and token
        /// [default: /etc/inferdns/inferdns.toml, read unless --admin is given].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask a running daemon why a service answers what it answers.
    Explain {
        /// The service: its id (`chat`) or DNS name (`chat.inference.example.com.`).
        #[arg(value_name = "SERVICE", required_unless_present = "name")]
        service: Option<String>,
        /// The service, as a flag (same as SERVICE).
        #[arg(long, conflicts_with = "service")]
        name: Option<String>,
        /// The client (resolver) address to explain the answer for.
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// An EDNS Client Subnet to explain the answer for, e.g. 203.0.113.0/24.
        #[arg(long)]
        ecs: Option<String>,
        /// The daemon's admin API address [default: `[server] admin-listen` of --config].
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// The daemon's configuration file, for its admin address and token
        /// [default: /etc/inferdns/inferdns.toml, read unless --admin is given].
        #[arg(long)]
        config: Option<PathBuf>,
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
            // The GeoIP database is opened once, by the start itself (which
            // refuses one that does not load, exit 1 as `check`): loading it
            // here too took as long again before the first answer.
            let (loaded, policy_files) =
                config::load_known(&config, &config::PolicyFiles::default())?;
            let options = StartOptions {
                dns_listen,
                admin_listen,
                config_path: Some(config),
                policy_files,
            };
            app::run(loaded, options).await
        }),
        Command::Status { admin, config } => block_on(status(admin, config)),
        Command::Explain {
            service,
            name,
            client,
            ecs,
            admin,
            config,
        } => {
            let service = service.or(name).unwrap_or_default();
            block_on(explain(service, client, ecs, admin, config))
        }
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

/// The default configuration file, where `status` and `explain` find the
/// daemon when not told.
const DEFAULT_CONFIG: &str = "/etc/inferdns/inferdns.toml";

fn admin_target(
    admin: Option<SocketAddr>,
    config: Option<PathBuf>,
) -> Result<AdminTarget, client::ClientError> {
    AdminTarget::find(admin, config.as_deref(), Path::new(DEFAULT_CONFIG))
}

/// `inferdns status`: GET /v1/status on the running daemon, print tables.
async fn status(admin: Option<SocketAddr>, config: Option<PathBuf>) -> Result<(), AppError> {
    let error = |e: client::ClientError| AppError::Status(e.to_string());
    let target = admin_target(admin, config).map_err(error)?;
    let body = target.get("/v1/status", &[]).await.map_err(error)?;
    print!("{}", client::render_status(&body));
    Ok(())
}

/// `inferdns explain`: GET /v1/explain on the running daemon, print the lines.
async fn explain(
    service: String,
    client: Option<std::net::IpAddr>,
    ecs: Option<String>,
    admin: Option<SocketAddr>,
    config: Option<PathBuf>,
) -> Result<(), AppError> {
    let error = |e: client::ClientError| AppError::Explain(e.to_string());
    let target = admin_target(admin, config).map_err(error)?;
    let mut query = vec![("name", service)];
    query.extend(client.map(|c| ("client", c.to_string())));
    query.extend(ecs.map(|e| ("ecs", e)));
    let body = target.get("/v1/explain", &query).await.map_err(error)?;
    for line in body["lines"].as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    Ok(())
}

fn block_on(future: impl std::future::Future<Output = Result<(), AppError>>) -> ExitCode {
    // Before any thread exists: the policy query threads get back; this
    // thread (which runs the root future) works in the background too.
    crate::sched::remember();
    crate::sched::background();
    crate::memory::tune();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(crate::sched::background)
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
