//! The gRPC edge: turns protobuf requests into daemon calls and maps results
//! and typed errors back. No product logic lives here.

use std::sync::Arc;

use ployz_api::{ApiError, ErrorClass, v1};
use tonic::{Request, Response, Status};

use super::{
    Daemon, VERSION,
    operations::{Finished, MeshInitResult},
};
use crate::{
    coordination::{OperationRecord, StepEvent},
    deploy::{DeployPlan, DeployRecord, record::RouteRecord},
    runtime::ContainerRuntime,
    services::SidecarOrigin,
    storage::VolumeBackend,
    time::unix_ms,
};

/// Default and maximum number of operations `op ls` returns.
const DEFAULT_OPERATION_LIMIT: usize = 50;
const MAX_OPERATION_LIMIT: usize = 1000;

/// The tonic service backed by the daemon.
pub struct ApiService {
    daemon: Arc<Daemon>,
}

impl ApiService {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self { daemon }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

fn reply<T>(result: Result<T, ApiError>) -> ApiResult<T> {
    result.map(Response::new).map_err(|error| {
        tracing::debug!(class = %error.class, code = %error.code, message = %error.message, "request failed");
        error.into_status()
    })
}

#[tonic::async_trait]
impl v1::ployz_server::Ployz for ApiService {
    async fn status(&self, _request: Request<v1::StatusRequest>) -> ApiResult<v1::StatusResponse> {
        let daemon = &self.daemon;
        let facts = daemon.status_facts().await;
        let uptime = daemon.started.elapsed();
        let nats = match (&facts.nats, &facts.nats_probe) {
            (Some(status), probe) => v1::SidecarStatus {
                state: status.state.as_str().to_owned(),
                pid: status.pid.unwrap_or(0),
                origin: status.origin.kind().to_owned(),
                config_hash: status.config_hash.clone(),
                client_url: status.client_url.clone(),
                reachable: probe.is_ok(),
                round_trip_us: probe
                    .as_ref()
                    .map(|(rtt, _)| rtt.as_micros() as u64)
                    .unwrap_or(0),
                server_version: probe.as_ref().map(|(_, v)| v.clone()).unwrap_or_default(),
                restarts: status.restarts,
                detail: match (probe, &status.origin) {
                    (Err(why), _) => why.clone(),
                    (Ok(_), SidecarOrigin::Recreated { reason }) => {
                        let detail = status.detail.clone().unwrap_or_default();
                        format!("recreated: {reason}. {detail}").trim().to_owned()
                    }
                    (Ok(_), SidecarOrigin::Started | SidecarOrigin::Adopted) => {
                        status.detail.clone().unwrap_or_default()
                    }
                },
            },
            (None, probe) => v1::SidecarStatus {
                state: if facts.identity.is_some() {
                    "failed"
                } else {
                    "not_configured"
                }
                .to_owned(),
                detail: probe.as_ref().err().cloned().unwrap_or_default(),
                ..v1::SidecarStatus::default()
            },
        };
        let datapath = crate::mesh::ebpf::availability();
        let runtime = match daemon.containers().await {
            Ok(containers) => match containers.version().await {
                Ok(version) => {
                    let managed = std::collections::BTreeMap::from([(
                        crate::runtime::labels::MANAGED.to_owned(),
                        "true".to_owned(),
                    )]);
                    let workloads = match containers.list(&managed).await {
                        Ok(found) => {
                            let running = found
                                .iter()
                                .filter(|c| c.state == crate::runtime::ContainerState::Running)
                                .count();
                            format!("{running} of {} workload container(s) running", found.len())
                        }
                        Err(error) => {
                            format!("cannot list workloads: {}", crate::error_chain(&error))
                        }
                    };
                    v1::DataPathStatus {
                        available: true,
                        detail: format!(
                            "Docker engine {version} at {}; {workloads}",
                            daemon.config.docker_socket.display()
                        ),
                    }
                }
                Err(error) => v1::DataPathStatus {
                    available: false,
                    detail: crate::error_chain(&error),
                },
            },
            Err(error) => v1::DataPathStatus {
                available: false,
                detail: error.message,
            },
        };
        let storage = match &daemon.volumes {
            Ok(volumes) => {
                let can = volumes.capabilities();
                v1::DataPathStatus {
                    available: true,
                    detail: format!(
                        "{} at {} (snapshots: {}, clones: {}, send/receive: {})",
                        volumes.kind(),
                        daemon.config.storage.path.display(),
                        yes_no(can.snapshots),
                        yes_no(can.clones),
                        yes_no(can.send_receive)
                    ),
                }
            }
            Err(reason) => v1::DataPathStatus {
                available: false,
                detail: reason.clone(),
            },
        };
        let routing: Vec<v1::RoutingProcess> = daemon
            .routing_processes()
            .await
            .into_iter()
            .map(|(component, answer)| routing_process(component, answer, None))
            .collect();
        let answered = |component: super::routing::Component| {
            routing
                .iter()
                .any(|process| process.component == component.name() && process.reachable)
        };
        let gateway = v1::SidecarStatus {
            reachable: answered(super::routing::Component::Gateway),
            ..routing_sidecar(&facts, super::routing::Component::Gateway)
        };
        let dns = v1::SidecarStatus {
            reachable: answered(super::routing::Component::Dns),
            ..routing_sidecar(&facts, super::routing::Component::Dns)
        };
        let (mesh_available, mesh_detail) = daemon.mesh_summary().await;
        reply(Ok(v1::StatusResponse {
            mesh: Some(v1::DataPathStatus {
                available: mesh_available,
                detail: mesh_detail,
            }),
            daemon: Some(v1::DaemonStatus {
                version: VERSION.to_owned(),
                pid: std::process::id(),
                started_at_unix_ms: unix_ms(daemon.started_at),
                uptime_ms: uptime.as_millis().try_into().unwrap_or(u64::MAX),
                socket: daemon.config.socket.display().to_string(),
                data_dir: daemon.config.data_dir.display().to_string(),
            }),
            machine: Some(v1::MachineStatus {
                id: facts
                    .identity
                    .as_ref()
                    .map(|i| i.machine_id.clone())
                    .unwrap_or_default(),
                hostname: daemon.hostname.clone(),
            }),
            cluster: facts.identity.as_ref().map(|identity| v1::ClusterStatus {
                network: identity.network.to_string(),
                cluster_id: identity.cluster_id.clone(),
                created_at_unix_ms: facts
                    .network
                    .as_ref()
                    .map(|n| n.created_at_unix_ms)
                    .unwrap_or(identity.created_at_unix_ms),
                machines: facts.machines.map(|n| n as u32).unwrap_or(0),
            }),
            nats: Some(nats),
            ebpf: Some(v1::DataPathStatus {
                available: datapath.available,
                detail: datapath.detail,
            }),
            runtime: Some(runtime),
            storage: Some(storage),
            gateway: Some(gateway),
            dns: Some(dns),
            routing,
        }))
    }

    async fn mesh_init(
        &self,
        request: Request<v1::MeshInitRequest>,
    ) -> ApiResult<v1::MeshInitResponse> {
        let request = request.into_inner();
        let result = self
            .daemon
            .mesh_init(&request.operation_id, &request.network, &request.endpoint)
            .await;
        reply(result.map(|finished: Finished<MeshInitResult>| {
            v1::MeshInitResponse {
                operation: Some(summary(&finished.record, finished.replayed)),
                outcome: finished.result.outcome,
                network: finished.result.network,
                cluster_id: finished.result.cluster_id,
                machine_id: finished.result.machine_id,
                overlay_address: finished
                    .result
                    .overlay_address
                    .map(|address| address.to_string())
                    .unwrap_or_default(),
                subnet: finished.result.subnet,
                public_key: finished.result.public_key,
            }
        }))
    }

    async fn list_machines(
        &self,
        _request: Request<v1::ListMachinesRequest>,
    ) -> ApiResult<v1::ListMachinesResponse> {
        let machines = self.daemon.list_machines().await;
        reply(machines.map(|machines| {
            v1::ListMachinesResponse {
                machines: machines
                    .into_iter()
                    .map(|machine| machine_entry(&machine.record, machine.observed))
                    .collect(),
            }
        }))
    }

    async fn mesh_status(
        &self,
        _request: Request<v1::MeshStatusRequest>,
    ) -> ApiResult<v1::MeshStatusResponse> {
        let view = self.daemon.mesh_status().await;
        reply(view.map(|view| {
            v1::MeshStatusResponse {
                network: view.network,
                interface: view.interface,
                public_key: view.public_key,
                listen_port: u32::from(view.listen_port),
                overlay_address: view.overlay_address.to_string(),
                subnet: view.subnet,
                prefix: view.prefix,
                tunnel: view.tunnel,
                peers: view
                    .peers
                    .into_iter()
                    .map(|peer| v1::MeshPeer {
                        machine_id: peer
                            .record
                            .as_ref()
                            .map(|r| r.id.clone())
                            .unwrap_or_default(),
                        hostname: peer
                            .record
                            .as_ref()
                            .map(|r| r.hostname.clone())
                            .unwrap_or_default(),
                        public_key: super::mesh::public_key_text(&peer.snapshot.public_key),
                        endpoint: peer
                            .snapshot
                            .endpoint
                            .map(|endpoint| endpoint.to_string())
                            .unwrap_or_default(),
                        last_handshake_unix_ms: peer
                            .snapshot
                            .last_handshake
                            .map_or(0, |at| u64::try_from(at.as_millis()).unwrap_or(u64::MAX)),
                        rx_bytes: peer.snapshot.rx_bytes,
                        tx_bytes: peer.snapshot.tx_bytes,
                        allowed_ips: peer
                            .snapshot
                            .allowed_ips
                            .iter()
                            .map(|ip| format!("{}/{}", ip.address(), ip.prefix_len()))
                            .collect(),
                        observed: peer.observed.to_owned(),
                    })
                    .collect(),
            }
        }))
    }

    async fn mesh_join_prepare(
        &self,
        request: Request<v1::MeshJoinPrepareRequest>,
    ) -> ApiResult<v1::MeshJoinPrepareResponse> {
        let request = request.into_inner();
        let prepared = self.daemon.mesh_join_prepare(&request.network).await;
        reply(prepared.map(|prepared| v1::MeshJoinPrepareResponse {
            state: prepared.state.to_owned(),
            machine_id: prepared.machine_id,
            network: prepared.network,
            cluster_id: prepared.cluster_id,
            public_key: prepared.public_key,
            listen_port: u32::from(prepared.listen_port),
            hostname: prepared.hostname,
        }))
    }

    async fn mesh_join(
        &self,
        request: Request<v1::MeshJoinRequest>,
    ) -> ApiResult<v1::MeshJoinResponse> {
        let request = request.into_inner();
        let joined = self.daemon.mesh_join(&request.ticket).await;
        reply(joined.map(|joined| {
            let (route_certificate_pem, route_certificate_pin) = joined
                .route_certificate
                .map(|certificate| (certificate.pem, certificate.pin))
                .unwrap_or_default();
            v1::MeshJoinResponse {
                outcome: joined.outcome.to_owned(),
                machine_id: joined.machine_id,
                overlay_address: joined.address.to_string(),
                route_certificate_pem,
                route_certificate_pin,
            }
        }))
    }

    async fn machine_admit(
        &self,
        request: Request<v1::MachineAdmitRequest>,
    ) -> ApiResult<v1::MachineAdmitResponse> {
        let request = request.into_inner();
        let admitted = self
            .daemon
            .machine_admit(
                &request.operation_id,
                &request.machine_id,
                &request.public_key,
                &request.endpoint,
                &request.hostname,
                &request.local_endpoint_ip,
            )
            .await;
        reply(admitted.map(|finished| v1::MachineAdmitResponse {
            operation: Some(summary(&finished.record, finished.replayed)),
            outcome: finished.result.outcome,
            ticket: finished.result.ticket,
            machine: Some(machine_entry(&finished.result.machine, "")),
        }))
    }

    async fn machine_activate(
        &self,
        request: Request<v1::MachineActivateRequest>,
    ) -> ApiResult<v1::MachineActivateResponse> {
        let request = request.into_inner();
        let activated = self
            .daemon
            .machine_activate(
                &request.operation_id,
                &request.machine_id,
                std::time::Duration::from_millis(u64::from(request.timeout_ms)),
                (!request.route_certificate_pem.is_empty()).then_some(
                    crate::machine::records::RouteCertificateRecord {
                        pem: request.route_certificate_pem,
                        pin: request.route_certificate_pin,
                    },
                ),
            )
            .await;
        reply(activated.map(|finished| {
            let activated = finished.result;
            v1::MachineActivateResponse {
                operation: Some(summary(&finished.record, finished.replayed)),
                outcome: activated.outcome,
                machine: Some(machine_entry(&activated.machine, "reachable")),
                handshake_unix_ms: activated.handshake_unix_ms,
                store_servers: u32::try_from(activated.store_servers).unwrap_or(u32::MAX),
                store_replicas: u32::try_from(activated.store_replicas).unwrap_or(u32::MAX),
            }
        }))
    }

    async fn list_operations(
        &self,
        request: Request<v1::ListOperationsRequest>,
    ) -> ApiResult<v1::ListOperationsResponse> {
        let limit = match request.into_inner().limit as usize {
            0 => DEFAULT_OPERATION_LIMIT,
            n => n.min(MAX_OPERATION_LIMIT),
        };
        let operations = self.daemon.list_operations(limit).await;
        reply(operations.map(|records| {
            v1::ListOperationsResponse {
                operations: records
                    .iter()
                    .map(|record| summary(record, false))
                    .collect(),
            }
        }))
    }

    async fn get_operation(
        &self,
        request: Request<v1::GetOperationRequest>,
    ) -> ApiResult<v1::GetOperationResponse> {
        let shown = self
            .daemon
            .show_operation(&request.into_inner().operation_id)
            .await;
        reply(shown.map(|(record, events)| v1::GetOperationResponse {
            operation: Some(summary(&record, false)),
            events: events.iter().map(event).collect(),
        }))
    }

    async fn deploy_preview(
        &self,
        request: Request<v1::DeployRequest>,
    ) -> ApiResult<v1::DeployPlan> {
        let plan = self
            .daemon
            .deploy_preview(&request.into_inner().manifest_toml)
            .await;
        reply(plan.map(|plan| deploy_plan(&plan)))
    }

    async fn deploy(&self, request: Request<v1::DeployRequest>) -> ApiResult<v1::DeployResponse> {
        let request = request.into_inner();
        let deployed = self
            .daemon
            .deploy(&request.operation_id, &request.manifest_toml)
            .await;
        reply(deployed.map(|reply| {
            v1::DeployResponse {
                operation: Some(summary(&reply.operation, reply.replayed)),
                commit: Some(deploy_commit(&reply.record)),
                plan: reply.plan.as_ref().map(deploy_plan),
                cleanup_failures: reply
                    .result
                    .cleanup_failures
                    .iter()
                    .map(|(container, reason)| v1::CleanupFailure {
                        container: container.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
                resumed: reply.result.resumed,
            }
        }))
    }

    async fn deploy_history(
        &self,
        request: Request<v1::DeployHistoryRequest>,
    ) -> ApiResult<v1::DeployHistoryResponse> {
        let history = self
            .daemon
            .deploy_history(&request.into_inner().namespace)
            .await;
        reply(history.map(|records| v1::DeployHistoryResponse {
            commits: records.iter().map(deploy_commit).collect(),
        }))
    }

    async fn deploy_show(
        &self,
        request: Request<v1::DeployShowRequest>,
    ) -> ApiResult<v1::DeployCommit> {
        let record = self.daemon.deploy_show(&request.into_inner().commit).await;
        reply(record.map(|record| deploy_commit(&record)))
    }

    async fn deploy_export(
        &self,
        request: Request<v1::DeployExportRequest>,
    ) -> ApiResult<v1::DeployExportResponse> {
        let exported = self
            .daemon
            .deploy_export(&request.into_inner().commit)
            .await;
        reply(exported.map(|(commit, manifest)| v1::DeployExportResponse {
            commit: commit.to_string(),
            manifest_toml: manifest.to_toml(),
        }))
    }

    async fn list_routes(
        &self,
        request: Request<v1::ListRoutesRequest>,
    ) -> ApiResult<v1::ListRoutesResponse> {
        let namespace = request.into_inner().namespace;
        let filter = (!namespace.is_empty()).then_some(namespace.as_str());
        if let Some(namespace) = filter {
            ployz_api::names::check_namespace(namespace).map_err(|message| {
                ApiError::new(ErrorClass::Usage, "invalid_namespace", message).into_status()
            })?;
        }
        let processes = self.daemon.routing_processes().await;
        reply(Ok(v1::ListRoutesResponse {
            processes: processes
                .into_iter()
                .map(|(component, answer)| routing_process(component, answer, filter))
                .collect(),
        }))
    }

    async fn shutdown(
        &self,
        request: Request<v1::ShutdownRequest>,
    ) -> ApiResult<v1::ShutdownResponse> {
        let stop_services = request.into_inner().stop_services;
        tracing::info!(stop_services, "shutdown requested over the API");
        reply(
            self.daemon
                .stop(stop_services)
                .await
                .map(|()| v1::ShutdownResponse {
                    pid: std::process::id(),
                }),
        )
    }
}

fn summary(record: &OperationRecord, replayed: bool) -> v1::OperationSummary {
    v1::OperationSummary {
        id: record.id.to_string(),
        kind: record.kind.clone(),
        state: record.state.as_str().to_owned(),
        started_at_unix_ms: record.started_at_unix_ms,
        finished_at_unix_ms: record.finished_at_unix_ms.unwrap_or(0),
        attempts: record.attempts,
        request_json: record.request.to_string(),
        result_json: record
            .result
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        error: record.error.as_ref().map(|error| v1::OperationError {
            class: error.class.clone(),
            code: error.code.clone(),
            message: error.message.clone(),
        }),
        replayed,
    }
}

fn event(step: &StepEvent) -> v1::OperationEvent {
    v1::OperationEvent {
        sequence: step.sequence,
        at_unix_ms: step.at_unix_ms,
        step: step.step.clone(),
        status: step.status.as_str().to_owned(),
        detail: step.detail.clone(),
        attempt: step.attempt,
    }
}

fn deploy_plan(plan: &DeployPlan) -> v1::DeployPlan {
    v1::DeployPlan {
        commit: plan.commit.to_string(),
        machine: plan.machine.clone(),
        services: plan
            .services
            .iter()
            .map(|service| v1::ServiceChange {
                service: service.service.clone(),
                action: service.action.as_str().to_owned(),
                strategy: service.strategy.as_str().to_owned(),
                replicas: service.replicas,
                current_containers: service.current.iter().map(|c| c.id.clone()).collect(),
                reason: service.reason.clone(),
                config_hash: service.config_hash.clone(),
                machines: service.machines.clone(),
            })
            .collect(),
        removed_services: plan
            .removed_services
            .iter()
            .map(|removed| v1::RemovedService {
                service: removed.service.clone(),
                containers: removed.containers.iter().map(|c| c.id.clone()).collect(),
            })
            .collect(),
        volumes: plan
            .volumes
            .iter()
            .map(|volume| v1::VolumeChange {
                volume: volume.volume.clone(),
                service: volume.service.clone(),
                create: volume.create,
                deploy_point: volume.deploy_point.clone().unwrap_or_default(),
                restore: volume.restore.clone().unwrap_or_default(),
            })
            .collect(),
        routes_changed: plan.routes.changed,
        routes: plan.routes.routes.iter().map(route).collect(),
        orphans: plan
            .orphans
            .iter()
            .map(|orphan| orphan.id.clone())
            .collect(),
        notes: plan.notes.clone(),
    }
}

fn deploy_commit(record: &DeployRecord) -> v1::DeployCommit {
    v1::DeployCommit {
        commit: record.commit.to_string(),
        operation: record.operation.clone(),
        created_at_unix_ms: record.created_at_unix_ms,
        machine: record.machine.clone(),
        reverts: record.reverts.clone().unwrap_or_default(),
        services: record
            .services
            .iter()
            .map(|(name, service)| v1::ServiceState {
                service: name.clone(),
                config_hash: service.config_hash.clone(),
                containers: service
                    .containers
                    .iter()
                    .map(|c| v1::Container {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        replica: c.replica,
                        machine: c.machine.clone(),
                        addresses: c.addresses.clone(),
                    })
                    .collect(),
            })
            .collect(),
        volumes: record
            .volumes
            .iter()
            .map(|(name, volume)| v1::VolumeState {
                volume: name.clone(),
                service: volume.service.clone(),
                deploy_point: volume.deploy_point.clone().unwrap_or_default(),
                restored_from: volume.restored_from.clone().unwrap_or_default(),
            })
            .collect(),
        routes: record.routes.iter().map(route).collect(),
        manifest_toml: record.manifest.to_toml(),
    }
}

fn machine_entry(record: &crate::machine::MachineRecord, observed: &str) -> v1::MachineEntry {
    let mesh = record.mesh.as_ref();
    v1::MachineEntry {
        id: record.id.clone(),
        hostname: record.hostname.clone(),
        network: record.network.to_string(),
        membership: record.membership.as_str().to_owned(),
        joined_at_unix_ms: record.joined_at_unix_ms,
        observed: observed.to_owned(),
        overlay_address: mesh
            .map(|mesh| mesh.overlay_address.to_string())
            .unwrap_or_default(),
        subnet: mesh
            .map(|mesh| format!("{}/64", subnet_base(mesh.overlay_address)))
            .unwrap_or_default(),
        endpoint: mesh
            .and_then(|mesh| mesh.endpoint)
            .map(|endpoint| endpoint.to_string())
            .unwrap_or_default(),
        public_key: mesh.map(|mesh| mesh.public_key.clone()).unwrap_or_default(),
        store_role: record.store_role.as_str().to_owned(),
    }
}

/// The /64 an overlay address lies in.
fn subnet_base(address: std::net::Ipv6Addr) -> std::net::Ipv6Addr {
    let mut octets = address.octets();
    octets[8..].fill(0);
    std::net::Ipv6Addr::from(octets)
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn route(route: &RouteRecord) -> v1::Route {
    v1::Route {
        service: route.service.clone(),
        hosts: route.hosts.clone(),
        paths: route.paths.clone(),
        tcp: route.tcp.map(u32::from).unwrap_or(0),
        port: u32::from(route.port),
        instances: route.instances.clone(),
    }
}

/// A routing process's own report, as the API shows it.
fn routing_process(
    component: super::routing::Component,
    answer: Result<ployz_routing::admin::AdminStatus, String>,
    namespace: Option<&str>,
) -> v1::RoutingProcess {
    match answer {
        Ok(status) => v1::RoutingProcess {
            component: component.name().to_owned(),
            reachable: true,
            error: String::new(),
            pid: status.pid,
            origin: status.origin.as_str().to_owned(),
            loaded_at_unix_ms: status.loaded_at_unix_ms,
            in_sync: status.follower.in_sync,
            last_sync_unix_ms: status.follower.last_sync_unix_ms.unwrap_or(0),
            store_error: status.follower.last_error.unwrap_or_default(),
            listeners: status.listeners,
            namespaces: status
                .namespaces
                .into_iter()
                .filter(|ns| namespace.is_none_or(|wanted| ns.namespace == wanted))
                .map(|ns| v1::ServedNamespace {
                    commit: format!("{}/{}", ns.namespace, ns.seq),
                    namespace: ns.namespace,
                    committed_at_unix_ms: ns.committed_at_unix_ms,
                    routes: ns
                        .routes
                        .into_iter()
                        .map(|route| v1::ServedRoute {
                            kind: route.kind,
                            service: route.service,
                            matches: route.matches,
                            targets: route.targets,
                        })
                        .collect(),
                })
                .collect(),
        },
        Err(error) => v1::RoutingProcess {
            component: component.name().to_owned(),
            reachable: false,
            error,
            ..v1::RoutingProcess::default()
        },
    }
}

/// A routing sidecar's supervision state for `status`.
fn routing_sidecar(
    facts: &super::operations::StatusFacts,
    component: super::routing::Component,
) -> v1::SidecarStatus {
    match facts.routing.iter().find(|(c, _)| *c == component) {
        Some((_, Ok(status))) => v1::SidecarStatus {
            state: status.state.as_str().to_owned(),
            pid: status.pid.unwrap_or(0),
            origin: status.origin.kind().to_owned(),
            config_hash: status.config_hash.clone(),
            client_url: status.client_url.clone(),
            restarts: status.restarts,
            detail: match &status.origin {
                SidecarOrigin::Recreated { reason } => format!(
                    "recreated: {reason}. {}",
                    status.detail.clone().unwrap_or_default()
                )
                .trim()
                .to_owned(),
                SidecarOrigin::Started | SidecarOrigin::Adopted => {
                    status.detail.clone().unwrap_or_default()
                }
            },
            ..v1::SidecarStatus::default()
        },
        Some((_, Err(reason))) => v1::SidecarStatus {
            state: "failed".to_owned(),
            detail: reason.clone(),
            ..v1::SidecarStatus::default()
        },
        None => v1::SidecarStatus {
            state: "not_configured".to_owned(),
            detail: "not started: this machine has no cluster yet".to_owned(),
            ..v1::SidecarStatus::default()
        },
    }
}
