//! `ployzctl machine …`: cluster membership.

use ployz_api::v1;

use super::{Context, READ_TIMEOUT};
use crate::{
    cli::MachineCommand,
    output::{table, timestamp},
};

pub async fn run(
    context: &Context<'_>,
    command: MachineCommand,
) -> Result<(), ployz_api::ApiError> {
    match command {
        MachineCommand::Add {
            network,
            targets,
            identity,
            ssh_options,
            timeout,
        } => {
            let timeout = super::machine_add::parse_timeout(&timeout)?;
            let ssh = super::machine_add::SshOptions {
                identity,
                options: ssh_options,
            };
            super::machine_add::add(context, &network, &targets, &ssh, timeout).await
        }
        MachineCommand::Ls => {
            let mut client = context.client(READ_TIMEOUT).await?;
            let response = client
                .list_machines(v1::ListMachinesRequest {})
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            context.output.emit(&response, || {
                let rows: Vec<Vec<String>> = response
                    .machines
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.hostname.clone(),
                            m.network.clone(),
                            m.membership.clone(),
                            m.store_role.clone(),
                            m.observed.clone(),
                            if m.overlay_address.is_empty() {
                                "-".to_owned()
                            } else {
                                m.overlay_address.clone()
                            },
                            timestamp(m.joined_at_unix_ms),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "HOSTNAME",
                        "NETWORK",
                        "MEMBERSHIP",
                        "STORE",
                        "OBSERVED",
                        "OVERLAY",
                        "JOINED",
                    ],
                    &rows,
                )
            });
            Ok(())
        }
    }
}
