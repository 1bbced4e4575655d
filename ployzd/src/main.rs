//! The `ployzd` binary: parses configuration, sets up logging and signals, and
//! runs the daemon until it is asked to stop.

use std::process::ExitCode;

use clap::Parser;
use ployzd::daemon::{self, DaemonArgs, DaemonConfig, error_chain};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// The Ployz daemon. Serves the primitives to ployzctl over a Unix socket and
/// supervises the data-plane sidecars (NATS), which keep serving when it stops.
#[derive(Debug, Parser)]
#[command(name = "ployzd", version, about)]
struct Cli {
    #[command(flatten)]
    args: DaemonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match DaemonConfig::resolve(&cli.args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ployzd: error: {}", error_chain(&error));
            return ExitCode::from(2);
        }
    };
    let filter = match EnvFilter::try_new(&config.log) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!(
                "ployzd: error: invalid log filter `{}`: {error}",
                config.log
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ployzd: error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = daemon::run(config, shutdown).await;
        signals.abort();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{}", error_chain(&error));
                eprintln!("ployzd: error: {}", error_chain(&error));
                if error.is_usage() {
                    ExitCode::from(2)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!(
            "cannot install signal handlers; stop the daemon with `ployzctl daemon stop`"
        );
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
