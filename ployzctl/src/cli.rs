//! The command-line surface: every command, flag and help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Ployz: explicit primitives for small clusters. Every change to the cluster
/// happens because you ran one command; nothing reconciles in the background.
///
/// Getting started on one machine:
///
///   ployzctl daemon install --runtime host --service-mode user
///   ployzctl mesh init dev
///   ployzctl status
///
/// Exit status: 0 ok, 1 internal, 2 usage, 3 precondition failed, 4 not found,
/// 5 conflict, 6 unavailable. With --json, failures print
/// {"error": {"class", "code", "message"}}.
#[derive(Debug, Parser)]
#[command(
    name = "ployzctl",
    version,
    propagate_version = true,
    verbatim_doc_comment
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Print machine-readable JSON (stable field names) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The daemon's socket [default: /run/ployz/ployzd.sock for root,
    /// $XDG_RUNTIME_DIR/ployz/ployzd.sock otherwise].
    #[arg(long, global = true, env = "PLOYZ_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print nothing but errors (the exit status tells the outcome).
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show live facts: this machine, its cluster, NATS, the daemon, the eBPF data path.
    Status,
    /// Run, install, stop and inspect the ployzd daemon on this machine.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// The cluster's network: found it on this machine.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Machines that are members of the cluster.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// Deploy a manifest: preview it, apply it, read the history, export a rollback.
    ///
    ///   ployzctl deploy preview -f app.toml      what would change
    ///   ployzctl deploy -f app.toml              apply it
    ///   ployzctl deploy history shop             the namespace's commits
    ///   ployzctl deploy export shop --commit 1 > rollback.toml
    ///   ployzctl deploy -f rollback.toml         roll back, volumes included
    #[command(verbatim_doc_comment)]
    Deploy(DeployArgs),
    /// Operations recorded by the cluster: what was asked, each step, the result.
    #[command(subcommand)]
    Op(OpCommand),
    /// What the gateway and DNS on this machine serve, as they report it themselves.
    ///
    ///   ployzctl routes ls             every namespace
    ///   ployzctl routes ls shop        one namespace
    #[command(subcommand, verbatim_doc_comment)]
    Routes(RoutesCommand),
    /// Print a shell completion script, e.g. `ployzctl completions bash > /etc/bash_completion.d/ployzctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for ployzctl and every subcommand into a directory.
    Man {
        /// Directory to write `ployzctl*.1` into (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Run ployzd in the foreground (logs to the terminal; Ctrl-C stops it, not its sidecars).
    Run(DaemonLaunchArgs),
    /// Start ployzd in the background and wait until it answers. Does nothing if it already runs.
    Install(InstallArgs),
    /// Stop ployzd gracefully. NATS and the rest of the data plane keep serving
    /// unless --services is given.
    Stop {
        /// Also stop the sidecars (NATS) this daemon supervises.
        #[arg(long)]
        services: bool,
    },
    /// Is ployzd running? Prints its pid, version and uptime.
    Status,
}

/// Flags passed through to ployzd.
#[derive(Debug, Clone, Default, Args)]
pub struct DaemonLaunchArgs {
    /// The daemon's configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's data directory.
    #[arg(long, env = "PLOYZ_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The NATS client port on loopback [default: 4722].
    #[arg(long, value_name = "PORT")]
    pub nats_port: Option<u16>,
    /// The nats-server binary to run.
    #[arg(long, value_name = "PATH")]
    pub nats_bin: Option<PathBuf>,
    /// Volume backend: btrfs, zfs or dir [default: dir].
    #[arg(long, value_name = "BACKEND")]
    pub storage_backend: Option<String>,
    /// btrfs pool directory, ZFS parent dataset, or dir root.
    #[arg(long, value_name = "PATH")]
    pub storage_path: Option<PathBuf>,
    /// btrfs: create a loop-file pool of this size (e.g. 2GiB) when the pool path is not on btrfs.
    #[arg(long, value_name = "SIZE")]
    pub storage_loop_size: Option<String>,
    /// How long a crashed operation keeps its lease, e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    pub operation_lease_ttl: Option<String>,
    /// The gateway's HTTP listeners, comma-separated, or `none` [default: 0.0.0.0:80].
    #[arg(long, value_name = "ADDR,...")]
    pub gateway_http: Option<String>,
    /// The gateway's HTTPS listeners, comma-separated, or `none` [default: 0.0.0.0:443].
    #[arg(long, value_name = "ADDR,...")]
    pub gateway_https: Option<String>,
    /// DNS listeners, comma-separated [default: 127.0.0.1:53 and the Docker bridge address, port 53].
    #[arg(long, value_name = "ADDR,...")]
    pub dns_listen: Option<String>,
    /// The ployzd binary [default: beside ployzctl, then PATH].
    #[arg(long, env = "PLOYZD_BIN", value_name = "PATH")]
    pub ployzd_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Where the data plane runs: on the host, or inside Docker.
    #[arg(long, value_enum, default_value_t = Runtime::Host)]
    pub runtime: Runtime,
    /// Who manages the daemon: this user (a detached process), or the init system.
    #[arg(long, value_enum, default_value_t = ServiceMode::User)]
    pub service_mode: ServiceMode,
    #[command(flatten)]
    pub launch: DaemonLaunchArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Runtime {
    Host,
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceMode {
    User,
    System,
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Found a cluster on this machine: create the network and machine
    /// identities and start NATS. Running it again for the same network is a
    /// no-op that says so.
    Init {
        /// Network name: 1-63 of a-z, 0-9 and -, starting with a letter.
        network: String,
        /// Where other machines reach this one's WireGuard on the underlay:
        /// `IP` or `IP:PORT`. When omitted, the first `machine add` records
        /// the address the new machine's SSH session came from.
        #[arg(long, value_name = "IP[:PORT]")]
        endpoint: Option<String>,
        #[command(flatten)]
        operation: OperationArgs,
    },
    /// This machine's overlay: its address and subnet, and each peer's
    /// endpoint, last handshake, bytes and reachability, observed now.
    Status,
    /// Joining, step 1 (run by `machine add` over SSH): print this
    /// machine's id and WireGuard key for a join of NETWORK.
    #[command(hide = true)]
    JoinPrepare {
        #[arg(long)]
        network: String,
    },
    /// Joining, step 2 (run by `machine add` over SSH): join with the
    /// ticket a member issued, read from stdin.
    #[command(hide = true)]
    Join,
}

/// Every mutating command takes an operation id.
#[derive(Debug, Clone, Args)]
pub struct OperationArgs {
    /// Operation id. Generated when omitted; pass the id of an earlier attempt
    /// to retry it: a finished operation returns its recorded result instead of acting twice.
    #[arg(long, value_name = "ID")]
    pub op_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// List member machines: membership as recorded, reachability as observed now.
    Ls,
    /// Add machines to this machine's network over SSH.
    ///
    /// For each target: connect (OpenSSH, key auth, your ~/.ssh/config
    /// applies), check the host (Linux, TUN, a Docker engine, free ports, not
    /// in another network), install this build's binaries, start ployzd,
    /// exchange keys, claim its overlay subnet, join NATS, and wait until it
    /// is reachable over the mesh and active. A failed step is named and the
    /// target stays retryable: run the same command again to finish. Adding a
    /// member again changes nothing and says so.
    ///
    ///   ployzctl machine add --network prod root@10.0.0.2 root@10.0.0.3
    ///   ployzctl machine add --network prod -i ~/.ssh/ployz admin@db-1
    #[command(verbatim_doc_comment)]
    Add {
        /// The network to add them to; must be this machine's.
        #[arg(long)]
        network: String,
        /// SSH targets: `[user@]host[:port]` or a Host alias from ~/.ssh/config.
        #[arg(required = true, value_name = "USER@HOST")]
        targets: Vec<String>,
        /// SSH private key to log in with (`ssh -i`).
        #[arg(short, long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Extra OpenSSH option, as for `ssh -o` (repeatable), e.g.
        /// `-o StrictHostKeyChecking=no`.
        #[arg(short = 'o', long = "ssh-option", value_name = "KEY=VALUE")]
        ssh_options: Vec<String>,
        /// How long to wait for each machine to become reachable and active.
        #[arg(long, default_value = "90s", value_name = "DURATION")]
        timeout: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// List served routes and DNS names: which commit each process serves, how
    /// fresh it is, and whether it follows the store or serves its last good table.
    Ls {
        /// Only this namespace.
        namespace: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OpCommand {
    /// List recorded operations, newest first.
    Ls {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one operation: its request, every step it recorded, its result.
    Show {
        /// The operation id, as printed by the command that ran it.
        id: String,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DeployArgs {
    #[command(subcommand)]
    pub command: Option<DeployCommand>,
    /// The manifest (TOML); `-` reads standard input. See docs/manifest.md.
    #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
    pub file: Option<PathBuf>,
    /// Print the plan and change nothing (the same as `deploy preview`).
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub operation: OperationArgs,
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// What deploying the manifest would do now, per machine; changes nothing.
    Preview {
        /// The manifest (TOML); `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// The namespace's commits, oldest first.
    History { namespace: String },
    /// One commit: its containers, volume snapshots, routes and manifest.
    Show {
        /// `<namespace>/<seq>`, e.g. `shop/3`.
        commit: String,
    },
    /// Print a manifest that reverts the namespace to a commit, volume data
    /// included. Deploy it to roll back (or forward).
    Export {
        namespace: String,
        /// The commit: its number (`3`) or id (`shop/3`).
        #[arg(long, value_name = "COMMIT")]
        commit: String,
    },
}
