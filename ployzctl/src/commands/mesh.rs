//! `ployzctl mesh …`: founding the cluster's network.

use ployz_api::{ApiError, ErrorClass, v1};

use super::{Context, OPERATION_TIMEOUT, op::operation_id};
use crate::cli::MeshCommand;

pub async fn run(context: &Context<'_>, command: MeshCommand) -> Result<(), ApiError> {
    match command {
        MeshCommand::Init { network, operation } => {
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
                    "{what}{replay}\n  cluster   {}\n  machine   {}\n  operation {operation_id}\n",
                    response.cluster_id, response.machine_id
                )
            });
            Ok(())
        }
    }
}
