//! `ployzctl deploy …`: the deploy primitive, its preview, history and rollback export.

use std::{fmt::Write as _, io::Read as _, path::Path, time::Duration};

use ployz_api::{ApiError, ErrorClass, v1};

use super::{Context, OPERATION_TIMEOUT, READ_TIMEOUT, op::operation_id};
use crate::{
    cli::{DeployArgs, DeployCommand},
    output::{table, timestamp},
};

pub async fn run(context: &Context<'_>, args: DeployArgs) -> Result<(), ApiError> {
    match args.command {
        Some(DeployCommand::Preview { file }) => preview(context, &file).await,
        Some(DeployCommand::History { namespace }) => history(context, namespace).await,
        Some(DeployCommand::Show { commit }) => show(context, commit).await,
        Some(DeployCommand::Export { namespace, commit }) => {
            export(context, &namespace, &commit).await
        }
        None => {
            let file = args.file.ok_or_else(|| {
                ApiError::new(
                    ErrorClass::Usage,
                    "manifest_required",
                    "name the manifest with -f FILE",
                )
            })?;
            if args.dry_run {
                preview(context, &file).await
            } else {
                apply(context, &file, args.operation.op_id).await
            }
        }
    }
}

fn read_manifest(file: &Path) -> Result<String, ApiError> {
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(file).map(|contents| text = contents)
    };
    read.map_err(|error| {
        ApiError::new(
            ErrorClass::Usage,
            "manifest_unreadable",
            format!("cannot read manifest {}: {error}", file.display()),
        )
    })?;
    Ok(text)
}

async fn preview(context: &Context<'_>, file: &Path) -> Result<(), ApiError> {
    let manifest_toml = read_manifest(file)?;
    let mut client = context.client(READ_TIMEOUT).await?;
    let plan = client
        .deploy_preview(v1::DeployRequest {
            operation_id: String::new(),
            manifest_toml,
        })
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    context.output.emit(&plan, || render_plan(&plan));
    Ok(())
}

async fn apply(context: &Context<'_>, file: &Path, op_id: Option<String>) -> Result<(), ApiError> {
    let manifest_toml = read_manifest(file)?;
    let operation_id = operation_id(op_id)?;
    context.output.progress(&format!(
        "operation {operation_id}: deploying {}",
        file.display()
    ));
    let mut client = context.client(OPERATION_TIMEOUT).await?;
    let deploy = client.deploy(v1::DeployRequest {
        operation_id: operation_id.clone(),
        manifest_toml,
    });
    let response = follow(context, &operation_id, deploy)
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    context.output.emit(&response, || {
        let mut text = String::new();
        let commit = response.commit.clone().unwrap_or_default();
        let how = match (
            response.operation.as_ref().is_some_and(|op| op.replayed),
            response.resumed,
        ) {
            (true, _) => " (recorded result replayed)",
            (false, true) => " (committed by an earlier attempt; cleanup finished)",
            (false, false) => "",
        };
        let _ = writeln!(text, "deployed {}{how}", commit.commit);
        if !commit.reverts.is_empty() {
            let _ = writeln!(text, "  reverts   {}", commit.reverts);
        }
        let _ = writeln!(text, "  operation {operation_id}");
        text.push_str(&render_commit_body(&commit));
        for failure in &response.cleanup_failures {
            let _ = writeln!(
                text,
                "  cleanup FAILED for {}: {} (the next deploy of the namespace removes it)",
                failure.container, failure.reason
            );
        }
        text
    });
    Ok(())
}

/// Runs `work` (an operation's request) while printing the steps the
/// operation records, as they happen, on a terminal.
async fn follow<F: Future>(context: &Context<'_>, operation_id: &str, work: F) -> F::Output {
    if !context.output.shows_progress() {
        return work.await;
    }
    let mut watcher = context.client(READ_TIMEOUT).await.ok();
    let mut seen = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = tick.tick() => {
                let Some(client) = watcher.as_mut() else { continue };
                let request = v1::GetOperationRequest { operation_id: operation_id.to_owned() };
                let Ok(response) = client.get_operation(request).await else { continue };
                for event in response.into_inner().events {
                    if event.sequence > seen {
                        seen = event.sequence;
                        let detail = if event.step == "intent" { "" } else { one_line(&event.detail, 100) };
                        context.output.progress(&format!("  {:<22} {:<9} {detail}", event.step, event.status));
                    }
                }
            }
        }
    }
}

async fn history(context: &Context<'_>, namespace: String) -> Result<(), ApiError> {
    let mut client = context.client(READ_TIMEOUT).await?;
    let response = client
        .deploy_history(v1::DeployHistoryRequest { namespace })
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    context.output.emit(&response, || {
        let rows: Vec<Vec<String>> = response
            .commits
            .iter()
            .map(|c| {
                vec![
                    c.commit.clone(),
                    timestamp(c.created_at_unix_ms),
                    c.services
                        .iter()
                        .map(|s| s.service.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    if c.reverts.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("reverts {}", c.reverts)
                    },
                    c.operation.clone(),
                ]
            })
            .collect();
        table(
            &["COMMIT", "CREATED", "SERVICES", "NOTE", "OPERATION"],
            &rows,
        )
    });
    Ok(())
}

async fn show(context: &Context<'_>, commit: String) -> Result<(), ApiError> {
    let mut client = context.client(READ_TIMEOUT).await?;
    let response = client
        .deploy_show(v1::DeployShowRequest { commit })
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    context.output.emit(&response, || {
        let mut text = format!(
            "commit {} at {} by operation {}\n",
            response.commit,
            timestamp(response.created_at_unix_ms),
            response.operation
        );
        if !response.reverts.is_empty() {
            let _ = writeln!(text, "  reverts   {}", response.reverts);
        }
        text.push_str(&render_commit_body(&response));
        let _ = write!(text, "\n# manifest\n{}", response.manifest_toml);
        text
    });
    Ok(())
}

async fn export(context: &Context<'_>, namespace: &str, commit: &str) -> Result<(), ApiError> {
    let commit = if commit.contains('/') {
        if !commit.starts_with(&format!("{namespace}/")) {
            return Err(ApiError::new(
                ErrorClass::Usage,
                "invalid_commit",
                format!("commit `{commit}` is not in namespace `{namespace}`"),
            ));
        }
        commit.to_owned()
    } else {
        format!("{namespace}/{commit}")
    };
    let mut client = context.client(READ_TIMEOUT).await?;
    let response = client
        .deploy_export(v1::DeployExportRequest { commit })
        .await
        .map_err(|e| context.call_error(e))?
        .into_inner();
    // The manifest is the output, so it prints even with -q; --json wraps it.
    if context.output.is_json() {
        context.output.emit(&response, String::new);
    } else {
        print!(
            "# Rollback to {}: deploy this manifest with `ployzctl deploy -f FILE`.\n{}",
            response.commit, response.manifest_toml
        );
    }
    Ok(())
}

fn render_plan(plan: &v1::DeployPlan) -> String {
    let mut text = format!("plan for {} on {}\n", plan.commit, plan.machine);
    for service in &plan.services {
        let _ = writeln!(
            text,
            "  service {:<16} {:<8} {:<12} {} replica(s): {}",
            service.service, service.action, service.strategy, service.replicas, service.reason
        );
        if service
            .machines
            .iter()
            .any(|machine| *machine != plan.machine)
        {
            let _ = writeln!(text, "    on {}", service.machines.join(", "));
        }
        for container in &service.current_containers {
            let verb = match service.action.as_str() {
                "keep" => "keep",
                _ => "replace",
            };
            let _ = writeln!(text, "    {verb} container {}", short(container));
        }
    }
    for removed in &plan.removed_services {
        let _ = writeln!(
            text,
            "  service {:<16} remove   {} container(s)",
            removed.service,
            removed.containers.len()
        );
    }
    for volume in &plan.volumes {
        let mut actions = Vec::new();
        if volume.create {
            actions.push("create".to_owned());
        }
        if !volume.deploy_point.is_empty() {
            actions.push(format!("snapshot {}", volume.deploy_point));
        }
        if !volume.restore.is_empty() {
            actions.push(format!("restore {}", volume.restore));
        }
        if actions.is_empty() {
            actions.push("keep".to_owned());
        }
        let _ = writeln!(
            text,
            "  volume  {:<16} {} (service {})",
            volume.volume,
            actions.join(", "),
            volume.service
        );
    }
    let routes = if plan.routes_changed {
        "change"
    } else {
        "unchanged"
    };
    let _ = writeln!(text, "  routes  {routes}");
    for route in &plan.routes {
        let _ = writeln!(text, "    {}", route_line(route));
    }
    for orphan in &plan.orphans {
        let _ = writeln!(text, "  remove orphan container {}", short(orphan));
    }
    for note in &plan.notes {
        let _ = writeln!(text, "  note: {note}");
    }
    text
}

fn render_commit_body(commit: &v1::DeployCommit) -> String {
    let mut text = String::new();
    for service in &commit.services {
        for container in &service.containers {
            let _ = writeln!(
                text,
                "  service {:<16} {} {} on {} {}",
                service.service,
                short(&container.id),
                container.name,
                container.machine,
                container.addresses.join(",")
            );
        }
    }
    for volume in &commit.volumes {
        let point = if volume.deploy_point.is_empty() {
            "none".to_owned()
        } else {
            volume.deploy_point.clone()
        };
        let restored = if volume.restored_from.is_empty() {
            String::new()
        } else {
            format!(", restored from {}", volume.restored_from)
        };
        let _ = writeln!(
            text,
            "  volume  {:<16} deploy point {point}{restored}",
            volume.volume
        );
    }
    for route in &commit.routes {
        let _ = writeln!(
            text,
            "  route   {} -> {}",
            route_line(route),
            route.instances.join(",")
        );
    }
    text
}

fn route_line(route: &v1::Route) -> String {
    if route.tcp != 0 {
        format!("tcp :{} -> {}:{}", route.tcp, route.service, route.port)
    } else {
        let paths = if route.paths.is_empty() {
            "/".to_owned()
        } else {
            route.paths.join(",")
        };
        format!(
            "http {}{} -> {}:{}",
            route.hosts.join(","),
            paths,
            route.service,
            route.port
        )
    }
}

/// The first line of `text`, at most `limit` characters.
fn one_line(text: &str, limit: usize) -> &str {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(limit) {
        Some((end, _)) => &line[..end],
        None => line,
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
