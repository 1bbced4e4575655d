//! What the gateway and DNS binaries share: logging to stderr, SIGTERM and
//! SIGINT as the shutdown signal, the snapshot channel fed by the last good
//! table and then the store, the admin socket, and owned tasks joined on exit.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    Snapshot, SnapshotReceiver,
    admin::{self, AdminError, AdminStatus, NamespaceStatus},
    config::SourceConfig,
    now_unix_ms,
    source::{self, FollowerStatus, StoreFollower},
};

/// How long tasks get to finish after the shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Logs to stderr (ployzd captures it in the sidecar's output log), filtered
/// by `PLOYZ_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PLOYZ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// Runs a routing binary's `run` future on a multi-threaded runtime with
/// logging set up; an error is logged and printed with its whole chain.
pub fn main<E: std::fmt::Display>(
    name: &str,
    run: impl Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("{name}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A running routing process: its snapshots, its follower and its tasks.
pub struct RoutingProcess {
    component: &'static str,
    snapshots: SnapshotReceiver,
    follower: watch::Receiver<FollowerStatus>,
    started_at_unix_ms: u64,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl RoutingProcess {
    /// Serves the last good table at once and starts following the store.
    pub fn start(component: &'static str, source: &SourceConfig) -> Self {
        let initial = source::initial_snapshot(&source.state_dir);
        info!(
            origin = initial.origin.as_str(),
            namespaces = initial.table.namespaces.len(),
            "starting with the {} table",
            initial.origin.as_str()
        );
        let (snapshot_sender, snapshots) = watch::channel(Arc::new(initial));
        let (status_sender, follower) = watch::channel(FollowerStatus::default());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let follower_task = StoreFollower::new(source.clone(), snapshot_sender, status_sender);
        tasks.spawn(follower_task.run(shutdown.clone()));
        tasks.spawn(cancel_on_signal(shutdown.clone()));
        Self {
            component,
            snapshots,
            follower,
            started_at_unix_ms: now_unix_ms(),
            shutdown,
            tasks,
        }
    }

    pub fn snapshots(&self) -> SnapshotReceiver {
        self.snapshots.clone()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs `task` until the process exits; it must stop on the shutdown token.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Binds the admin socket and answers it with the status `describe` adds
    /// to the common part. Call after every listener is bound: an answering
    /// admin socket is what tells ployzd the process is ready.
    pub fn serve_admin<F>(
        &mut self,
        source: &SourceConfig,
        listeners: Vec<String>,
        describe: F,
    ) -> Result<(), AdminError>
    where
        F: Fn(&Snapshot) -> (Vec<NamespaceStatus>, serde_json::Value) + Send + Sync + 'static,
    {
        let listener = admin::bind(&source.admin_socket)?;
        let snapshots = self.snapshots.clone();
        let follower = self.follower.clone();
        let component = self.component;
        let started_at_unix_ms = self.started_at_unix_ms;
        let status = move || {
            let snapshot = snapshots.borrow().clone();
            let (namespaces, stats) = describe(&snapshot);
            AdminStatus {
                component: component.to_owned(),
                pid: std::process::id(),
                ready: true,
                started_at_unix_ms,
                origin: snapshot.origin,
                loaded_at_unix_ms: snapshot.loaded_at_unix_ms,
                follower: follower.borrow().clone(),
                listeners: listeners.clone(),
                namespaces,
                stats,
            }
        };
        self.tasks.spawn(admin::serve(
            listener,
            Arc::new(status),
            self.shutdown.clone(),
        ));
        Ok(())
    }

    /// Waits for the shutdown signal, then for every task, within a grace.
    pub async fn run_until_shutdown(mut self) {
        self.shutdown.cancelled().await;
        info!("shutting down");
        let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            warn!("tasks did not finish within {SHUTDOWN_GRACE:?}; aborting them");
            self.tasks.shutdown().await;
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot watch for SIGTERM/SIGINT; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM"),
        _ = interrupt.recv() => info!("SIGINT"),
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
