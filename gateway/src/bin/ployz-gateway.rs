//! ployz-gateway: the HTTP, HTTPS and TCP proxy of a Ployz machine. ployzd
//! starts it with a config file it renders; it runs in its own session and
//! keeps serving when ployzd, or NATS, is gone.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use ployz_gateway::{
    http::{Proxy, ProxyOptions},
    tcp::{TcpOptions, TcpRoutes},
    tls::TlsTerminator,
};
use ployz_routing::{
    admin,
    config::{self, GatewayConfig},
    process::{self, RoutingProcess},
};
use tokio::net::TcpListener;

/// The Ployz gateway: serves the routes committed by deploys.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The config file ployzd rendered (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    process::main("ployz-gateway", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config: GatewayConfig = config::load(&args.config)?;
    let mut routing = RoutingProcess::start("gateway", &config.source);
    let shutdown = routing.shutdown_token();
    let proxy = Proxy::new(routing.snapshots(), ProxyOptions::default());
    let mut listeners = Vec::new();

    for address in &config.http_listen {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for HTTP on {address}"))?;
        listeners.push(format!("http://{address}"));
        routing.spawn(proxy.clone().serve(listener, shutdown.clone()));
    }
    if !config.https_listen.is_empty() {
        let tls = TlsTerminator::new(routing.snapshots())?;
        for address in &config.https_listen {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for HTTPS on {address}"))?;
            listeners.push(format!("https://{address}"));
            routing.spawn(
                proxy
                    .clone()
                    .serve_tls(listener, tls.clone(), shutdown.clone()),
            );
        }
    }
    let tcp = TcpRoutes::new(
        routing.snapshots(),
        config.tcp_listen_ip,
        TcpOptions::default(),
    );
    routing.spawn(tcp.clone().run(shutdown.clone()));
    listeners.push(format!("tcp routes on {}", config.tcp_listen_ip));

    let described = proxy.clone();
    routing.serve_admin(&config.source, listeners, move |snapshot| {
        let stats = serde_json::json!({
            "http": described.stats(),
            "tcp": tcp.status(),
        });
        (admin::gateway_namespaces(&snapshot.table), stats)
    })?;
    tracing::info!("gateway ready");
    routing.run_until_shutdown().await;
    Ok(())
}
