//! `ployzctl routes …`: what the routing processes serve, in their own words.

use std::fmt::Write as _;

use ployz_api::{ApiError, ErrorClass, v1};

use super::{Context, READ_TIMEOUT};
use crate::{
    cli::RoutesCommand,
    output::{duration_ms, now_unix_ms, table},
};

pub async fn run(context: &Context<'_>, command: RoutesCommand) -> Result<(), ApiError> {
    match command {
        RoutesCommand::Ls { namespace } => {
            if let Some(namespace) = &namespace {
                ployz_api::names::check_namespace(namespace).map_err(|message| {
                    ApiError::new(ErrorClass::Usage, "invalid_namespace", message)
                })?;
            }
            let mut client = context.client(READ_TIMEOUT).await?;
            let response = client
                .list_routes(v1::ListRoutesRequest {
                    namespace: namespace.unwrap_or_default(),
                })
                .await
                .map_err(|e| context.call_error(e))?
                .into_inner();
            context
                .output
                .emit(&response, || render(&response.processes));
            Ok(())
        }
    }
}

/// The routing processes and their routes, for `routes ls` and `status`.
pub fn render(processes: &[v1::RoutingProcess]) -> String {
    let now = now_unix_ms();
    let mut text = String::new();
    let mut rows = Vec::new();
    for process in processes {
        let _ = writeln!(text, "{}", summary(process, now));
        for namespace in &process.namespaces {
            for route in &namespace.routes {
                rows.push(vec![
                    process.component.clone(),
                    namespace.namespace.clone(),
                    route.service.clone(),
                    route.kind.clone(),
                    route.matches.join(" "),
                    if route.targets.is_empty() {
                        "(no instances)".to_owned()
                    } else {
                        route.targets.join(" ")
                    },
                    namespace.commit.clone(),
                ]);
            }
        }
    }
    if !rows.is_empty() {
        text.push('\n');
        text.push_str(&table(
            &[
                "FROM",
                "NAMESPACE",
                "SERVICE",
                "KIND",
                "MATCH",
                "TARGETS",
                "COMMIT",
            ],
            &rows,
        ));
    }
    text
}

/// One line per process: reachable or not, where its table came from, how fresh.
pub fn summary(process: &v1::RoutingProcess, now: u64) -> String {
    if !process.reachable {
        return format!("{:<9} not answering: {}", process.component, process.error);
    }
    let commits: Vec<&str> = process
        .namespaces
        .iter()
        .map(|ns| ns.commit.as_str())
        .collect();
    let source = if process.in_sync {
        format!(
            "following the store (synced {} ago)",
            duration_ms(now.saturating_sub(process.last_sync_unix_ms))
        )
    } else {
        format!(
            "serving its {} table, loaded {} ago; store: {}",
            process.origin,
            duration_ms(now.saturating_sub(process.loaded_at_unix_ms)),
            if process.store_error.is_empty() {
                "not reached yet"
            } else {
                &process.store_error
            }
        )
    };
    format!(
        "{:<9} pid {} on {}; {}; serves {}",
        process.component,
        process.pid,
        if process.listeners.is_empty() {
            "no listener".to_owned()
        } else {
            process.listeners.join(", ")
        },
        source,
        if commits.is_empty() {
            "no commit".to_owned()
        } else {
            commits.join(", ")
        }
    )
}
