//! `ployz-tunnel`: the long-lived userspace WireGuard process. Creates the TUN
//! device, binds the UDP socket and serves the WireGuard UAPI on
//! `<uapi-dir>/<interface>.sock`, so `wg show` / `wg set` configure it. It runs
//! apart from ployzd so the overlay keeps carrying traffic while ployzd
//! restarts. SIGTERM or SIGINT stops it cleanly (the socket file is removed).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::Parser;
use ployzd::{
    error_chain,
    mesh::boringtun::{DEFAULT_UAPI_DIR, Device, UapiServer, bind_udp, create_tun},
};
use tokio::{net::UnixListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Userspace WireGuard tunnel speaking the standard UAPI (configure it with `wg`).
#[derive(Debug, Parser)]
#[command(name = "ployz-tunnel", version, about)]
struct Cli {
    /// The TUN interface to create (at most 15 bytes).
    #[arg(long)]
    interface: String,
    /// Where to put the UAPI socket `<interface>.sock`; `wg` looks in the default.
    #[arg(long, default_value = DEFAULT_UAPI_DIR)]
    uapi_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ployz-tunnel: error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ployz-tunnel: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.interface.is_empty() || cli.interface.len() > 15 || cli.interface.contains(['/', '\0']) {
        bail!("invalid interface name `{}`", cli.interface);
    }
    std::fs::create_dir_all(&cli.uapi_dir)
        .with_context(|| format!("cannot create {}", cli.uapi_dir.display()))?;
    let socket_path = cli.uapi_dir.join(format!("{}.sock", cli.interface));
    let listener = bind_uapi(&socket_path)?;
    let tun = create_tun(&cli.interface)
        .await
        .map_err(|error| anyhow::anyhow!(error_chain(&error)))?;
    let udp = bind_udp(0, None).map_err(|error| anyhow::anyhow!(error_chain(&error)))?;
    tracing::info!(
        interface = %cli.interface,
        uapi = %socket_path.display(),
        "tunnel up"
    );

    let (commands, receiver) = mpsc::channel(16);
    let device =
        Device::new(tun, udp, receiver).map_err(|error| anyhow::anyhow!(error_chain(&error)))?;
    let server = UapiServer::new(listener, commands);
    let shutdown = CancellationToken::new();
    // Whichever part stops first stops the others.
    tokio::join!(
        async {
            device.run(shutdown.clone()).await;
            shutdown.cancel();
        },
        async {
            server.run(shutdown.clone()).await;
            shutdown.cancel();
        },
        cancel_on_signal(shutdown.clone()),
    );
    if let Err(error) = std::fs::remove_file(&socket_path) {
        tracing::warn!(%error, path = %socket_path.display(), "cannot remove the UAPI socket");
    }
    tracing::info!(interface = %cli.interface, "tunnel stopped");
    Ok(())
}

/// Binds the UAPI socket, replacing a stale file but refusing to take over a
/// socket another live tunnel still serves. Only root may connect: the socket
/// hands out the private key.
fn bind_uapi(path: &Path) -> anyhow::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("{} is served by another running tunnel", path.display());
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot remove stale {}", path.display()));
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Cancels `shutdown` on SIGINT or SIGTERM; returns when `shutdown` is cancelled.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the tunnel with SIGKILL");
        shutdown.cancelled().await;
        return;
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = interrupt.recv() => shutdown.cancel(),
        _ = terminate.recv() => shutdown.cancel(),
    }
}
