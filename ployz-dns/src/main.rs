//! ployz-dns: the resolver of a Ployz machine. It answers
//! `<service>.<namespace>.ployz.internal` from committed deploys and forwards
//! every other name to the host's resolvers. ployzd starts it with a config
//! file it renders; it runs in its own session and outlives ployzd.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use ployz_dns::{DnsOptions, DnsServer, bind_tcp, bind_udp_shared, upstreams_from_resolv_conf};
use ployz_routing::{
    admin,
    config::{self, DnsConfig},
    process::{self, RoutingProcess},
};

/// Ployz DNS: serves ployz.internal and forwards the rest.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The config file ployzd rendered (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    process::main("ployz-dns", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config: DnsConfig = config::load(&args.config)?;
    let upstreams = if config.upstreams.is_empty() {
        let text = std::fs::read_to_string(&config.resolv_conf).with_context(|| {
            format!(
                "cannot read resolvers from {}",
                config.resolv_conf.display()
            )
        })?;
        upstreams_from_resolv_conf(&text, &config.listen)
    } else {
        config.upstreams.clone()
    };
    if upstreams.is_empty() {
        tracing::warn!("no upstream resolver: names outside ployz.internal get SERVFAIL");
    } else {
        tracing::info!(?upstreams, "forwarding other names");
    }
    let mut routing = RoutingProcess::start("dns", &config.source);
    let shutdown = routing.shutdown_token();
    let server = DnsServer::new(routing.snapshots(), upstreams, DnsOptions::default());
    let mut listeners = Vec::new();
    // One UDP receive loop per worker thread, on SO_REUSEPORT sockets: a
    // single loop runs on one thread however many the runtime has.
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    for address in &config.listen {
        let sockets = bind_udp_shared(*address, workers)
            .with_context(|| format!("cannot listen for DNS on udp {address}"))?;
        let listener = bind_tcp(*address)
            .with_context(|| format!("cannot listen for DNS on tcp {address}"))?;
        listeners.push(address.to_string());
        for socket in sockets {
            routing.spawn(server.clone().serve_udp(socket, shutdown.clone()));
        }
        routing.spawn(server.clone().serve_tcp(listener, shutdown.clone()));
    }
    let described = server.clone();
    routing.serve_admin(&config.source, listeners, move |snapshot| {
        let stats = serde_json::to_value(described.stats()).unwrap_or_default();
        (admin::dns_namespaces(&snapshot.table), stats)
    })?;
    tracing::info!("dns ready");
    routing.run_until_shutdown().await;
    Ok(())
}
