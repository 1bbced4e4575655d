//! `ployzctl op …`: the operations the cluster recorded.

use std::fmt::Write as _;

use ployz_api::{ApiError, ErrorClass, v1};

use super::{Context, READ_TIMEOUT};
use crate::{
    cli::OpCommand,
    output::{table, timestamp},
};

/// The operation id to send: the operator's (validated), or a new time-ordered UUID.
pub fn operation_id(given: Option<String>) -> Result<String, ApiError> {
    match given {
        Some(id) => {
            ployz_api::names::check_operation_id(&id).map_err(|message| {
                ApiError::new(ErrorClass::Usage, "invalid_operation_id", message)
            })?;
            Ok(id)
        }
        None => Ok(uuid::Uuid::now_v7().to_string()),
    }
}

pub async fn run(context: &Context<'_>, command: OpCommand) -> Result<(), ApiError> {
    let mut client = context.client(READ_TIMEOUT).await?;
    match command {
        OpCommand::Ls { limit } => {
            let response = client
                .list_operations(v1::ListOperationsRequest { limit })
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            context.output.emit(&response, || {
                let rows: Vec<Vec<String>> = response
                    .operations
                    .iter()
                    .map(|op| {
                        vec![
                            op.id.clone(),
                            op.kind.clone(),
                            op.state.clone(),
                            op.attempts.to_string(),
                            timestamp(op.started_at_unix_ms),
                            timestamp(op.finished_at_unix_ms),
                        ]
                    })
                    .collect();
                table(
                    &["ID", "KIND", "STATE", "ATTEMPTS", "STARTED", "FINISHED"],
                    &rows,
                )
            });
        }
        OpCommand::Show { id } => {
            let response = client
                .get_operation(v1::GetOperationRequest { operation_id: id })
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            context.output.emit(&response, || render(&response));
        }
    }
    Ok(())
}

fn render(response: &v1::GetOperationResponse) -> String {
    let mut text = String::new();
    if let Some(op) = &response.operation {
        let _ = writeln!(text, "operation {} ({})", op.id, op.kind);
        let _ = writeln!(
            text,
            "  state     {} after {} attempt(s)",
            op.state, op.attempts
        );
        let _ = writeln!(text, "  started   {}", timestamp(op.started_at_unix_ms));
        let _ = writeln!(text, "  finished  {}", timestamp(op.finished_at_unix_ms));
        let _ = writeln!(text, "  request   {}", op.request_json);
        if !op.result_json.is_empty() {
            let _ = writeln!(text, "  result    {}", op.result_json);
        }
        if let Some(error) = &op.error {
            let _ = writeln!(
                text,
                "  error     {} ({}): {}",
                error.class, error.code, error.message
            );
        }
    }
    let rows: Vec<Vec<String>> = response
        .events
        .iter()
        .map(|e| {
            vec![
                e.sequence.to_string(),
                timestamp(e.at_unix_ms),
                e.attempt.to_string(),
                e.step.clone(),
                e.status.clone(),
                e.detail.clone(),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&table(
        &["SEQ", "AT", "ATTEMPT", "STEP", "STATUS", "DETAIL"],
        &rows,
    ));
    text
}
