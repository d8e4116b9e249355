use std::process::ExitCode;

use clap::Parser;
use inferdns::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    inferdns::log::init(cli::default_log_filter(&cli), cli.log_format);
    cli::main(cli)
}
