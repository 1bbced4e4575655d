//! `ployzctl status`: live facts from the daemon.

use std::fmt::Write as _;

use ployz_api::v1;

use super::{Context, READ_TIMEOUT};
use crate::output::{duration_ms, timestamp};

pub async fn status(context: &Context<'_>) -> Result<(), ployz_api::ApiError> {
    let mut client = context.client(READ_TIMEOUT).await?;
    let status = client
        .status(v1::StatusRequest {})
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    context.output.emit(&status, || render(&status));
    Ok(())
}

fn render(status: &v1::StatusResponse) -> String {
    let mut text = String::new();
    if let Some(machine) = &status.machine {
        let id = if machine.id.is_empty() {
            "(no identity yet)"
        } else {
            &machine.id
        };
        let _ = writeln!(text, "machine   {id} on {}", machine.hostname);
    }
    match &status.cluster {
        Some(cluster) => {
            let _ = writeln!(
                text,
                "cluster   network {} ({}), {} machine(s), founded {}",
                cluster.network,
                cluster.cluster_id,
                cluster.machines,
                timestamp(cluster.created_at_unix_ms)
            );
        }
        None => {
            let _ = writeln!(
                text,
                "cluster   none: run `ployzctl mesh init <network>` to found one"
            );
        }
    }
    if let Some(nats) = &status.nats {
        let live = if nats.reachable {
            format!(
                "reachable, {} µs round trip, nats-server {}",
                nats.round_trip_us, nats.server_version
            )
        } else {
            format!("not reachable: {}", nats.detail)
        };
        match nats.state.as_str() {
            "not_configured" => {
                let _ = writeln!(text, "nats      not started ({})", nats.detail);
            }
            _ => {
                let _ = writeln!(
                    text,
                    "nats      {} pid {} at {} ({}, {} restart(s)); {live}",
                    nats.state, nats.pid, nats.client_url, nats.origin, nats.restarts
                );
            }
        }
    }
    if let Some(daemon) = &status.daemon {
        let _ = writeln!(
            text,
            "daemon    ployzd {} pid {}, up {}, socket {}",
            daemon.version,
            daemon.pid,
            duration_ms(daemon.uptime_ms),
            daemon.socket
        );
    }
    for (name, subsystem) in [
        ("mesh", &status.mesh),
        ("runtime", &status.runtime),
        ("storage", &status.storage),
    ] {
        if let Some(subsystem) = subsystem {
            let state = if subsystem.available {
                "available"
            } else {
                "unavailable"
            };
            let _ = writeln!(text, "{name:<9} {state}: {}", subsystem.detail);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        });
    for (sidecar, process) in [
        (
            &status.gateway,
            status.routing.iter().find(|p| p.component == "gateway"),
        ),
        (
            &status.dns,
            status.routing.iter().find(|p| p.component == "dns"),
        ),
    ] {
        match (sidecar, process) {
            (Some(sidecar), _) if sidecar.state != "running" => {
                let name = process.map_or("routing", |p| p.component.as_str());
                let _ = writeln!(text, "{name:<9} {}: {}", sidecar.state, sidecar.detail);
            }
            (Some(sidecar), Some(process)) => {
                let _ = writeln!(
                    text,
                    "{} ({}, {} restart(s))",
                    super::routes::summary(process, now),
                    sidecar.origin,
                    sidecar.restarts
                );
            }
            (None, Some(process)) => {
                let _ = writeln!(text, "{}", super::routes::summary(process, now));
            }
            (_, None) => {}
        }
    }
    if let Some(ebpf) = &status.ebpf {
        let state = if ebpf.available {
            "available"
        } else {
            "unavailable"
        };
        let _ = writeln!(text, "ebpf      {state}: {}", ebpf.detail);
    }
    text
}
