//! `node-agent`: parse and validate the configuration (a bad value stops it here, naming the variable), then run
//! the agent on a current-thread runtime until SIGTERM/SIGINT; or, with `status`, print this node's status.

use std::process::ExitCode;

use clap::Parser;
use node_agent::config::{Args, Subcommand};

fn main() -> ExitCode {
    let mut args = Args::parse();
    let command = args.command.take();
    let cfg = match args.validate() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("node-agent: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // Known before anything is logged or printed: no line may carry it (see cni_plugin::redact).
    node_agent::install::register_token(&cfg);
    if let Some(Subcommand::Status(status)) = command {
        let (text, ready) = node_agent::status::run(&cfg, &status);
        print!("{}", cni_plugin::redact::scrub(&text));
        return if ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let directive = match cfg.log_level.as_str() {
        "none" => "off",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NODE_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directive));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(cni_plugin::redact::Redacted(std::io::stderr))
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(node_agent::agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node agent failed");
            ExitCode::FAILURE
        }
    }
}
