//! `ployzctl mesh …`: founding the cluster's network, looking at the
//! overlay, and the target's half of a join (run by `machine add` over SSH).

use std::io::Read as _;

use ployz_api::{ApiError, ErrorClass, v1};

use super::{Context, OPERATION_TIMEOUT, READ_TIMEOUT, op::operation_id};
use crate::{
    cli::MeshCommand,
    output::{table, timestamp},
};

pub async fn run(context: &Context<'_>, command: MeshCommand) -> Result<(), ApiError> {
    match command {
        MeshCommand::Status => status(context).await,
        MeshCommand::JoinPrepare { network } => {
            let mut client = context.client(READ_TIMEOUT).await?;
            let response = client
                .mesh_join_prepare(v1::MeshJoinPrepareRequest { network })
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            context.output.emit(&response, || {
                format!(
                    "{} machine {} (network `{}`), key {}\n",
                    response.state, response.machine_id, response.network, response.public_key
                )
            });
            Ok(())
        }
        MeshCommand::Join => {
            let mut ticket = String::new();
            std::io::stdin()
                .read_to_string(&mut ticket)
                .map_err(|error| {
                    ApiError::new(
                        ErrorClass::Usage,
                        "ticket_unreadable",
                        format!("cannot read the join ticket from stdin: {error}"),
                    )
                })?;
            let mut client = context.client(OPERATION_TIMEOUT).await?;
            let response = client
                .mesh_join(v1::MeshJoinRequest { ticket })
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            context.output.emit(&response, || {
                format!(
                    "{}: machine {} at {}\n",
                    response.outcome, response.machine_id, response.overlay_address
                )
            });
            Ok(())
        }
        MeshCommand::Init {
            network,
            endpoint,
            operation,
        } => {
            ployz_api::names::check_network_name(&network).map_err(|message| {
                ApiError::new(ErrorClass::Usage, "invalid_network_name", message)
            })?;
            let operation_id = operation_id(operation.op_id)?;
            context.output.progress(&format!(
                "operation {operation_id}: founding network `{network}`"
            ));
            let mut client = context.client(OPERATION_TIMEOUT).await?;
            let response = client
                .mesh_init(v1::MeshInitRequest {
                    operation_id: operation_id.clone(),
                    network,
                    endpoint: endpoint.unwrap_or_default(),
                })
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            let replayed = response.operation.as_ref().is_some_and(|op| op.replayed);
            context.output.emit(&response, || {
                let what = match response.outcome.as_str() {
                    "created" => format!("founded network `{}`", response.network),
                    _ => format!(
                        "already initialized: this machine is a member of `{}`; nothing changed",
                        response.network
                    ),
                };
                let replay = if replayed {
                    " (recorded result replayed)"
                } else {
                    ""
                };
                format!(
                    "{what}{replay}\n  cluster   {}\n  machine   {}\n  overlay   {} (subnet {})\n  key       {}\n  operation {operation_id}\n",
                    response.cluster_id,
                    response.machine_id,
                    response.overlay_address,
                    response.subnet,
                    response.public_key
                )
            });
            Ok(())
        }
    }
}

async fn status(context: &Context<'_>) -> Result<(), ApiError> {
    let mut client = context.client(READ_TIMEOUT).await?;
    let response = client
        .mesh_status(v1::MeshStatusRequest {})
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    context.output.emit(&response, || {
        let rows: Vec<Vec<String>> = response
            .peers
            .iter()
            .map(|peer| {
                vec![
                    if peer.machine_id.is_empty() {
                        "-".to_owned()
                    } else {
                        peer.machine_id.clone()
                    },
                    or_dash(&peer.endpoint),
                    if peer.last_handshake_unix_ms == 0 {
                        "never".to_owned()
                    } else {
                        timestamp(peer.last_handshake_unix_ms)
                    },
                    peer.rx_bytes.to_string(),
                    peer.tx_bytes.to_string(),
                    peer.allowed_ips.join(","),
                    peer.observed.clone(),
                ]
            })
            .collect();
        format!(
            "network   {}\ninterface {} (port {}, tunnel {})\naddress   {} in {} (prefix {})\nkey       {}\n\n{}",
            response.network,
            response.interface,
            response.listen_port,
            response.tunnel,
            response.overlay_address,
            response.subnet,
            response.prefix,
            response.public_key,
            table(
                &["PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX", "ALLOWED IPS", "OBSERVED"],
                &rows
            )
        )
    });
    Ok(())
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}
