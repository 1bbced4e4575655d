//! Developer workflows for Ployz, in Rust so a contributor needs only cargo:
//!
//! - `cargo xtask setup`: install what Ployz and its tests need (idempotent).
//! - `cargo xtask test`: setup, format check, clippy, every test. CI runs this.
//! - `cargo xtask up`: start a single-machine cluster from this checkout.
//! - `cargo xtask down`: stop it, sidecars included.
//! - `cargo xtask bench overlay|gateway|dns`: overlay, HTTP proxy and DNS figures
//!   next to references measured in the same run.

mod bench;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Ployz developer workflows")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install apt packages, nats-server, and the eBPF toolchain; check Docker.
    Setup {
        /// Install Debian's docker.io when no Docker engine answers.
        #[arg(long)]
        install_docker: bool,
    },
    /// Run setup, then `cargo fmt --check`, clippy -D warnings, and every test.
    Test {
        /// Skip setup (when you know the machine is ready).
        #[arg(long)]
        no_setup: bool,
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Start a single-machine cluster under target/ployz-dev (daemon, NATS, a
    /// btrfs loop pool when root), deploy examples/hello.toml, and show how to reach it.
    Up,
    /// Stop the cluster started by `up`: its app, NATS, the daemon, the pool.
    Down,
    /// Run a benchmark and print its figures next to a reference (overlay needs root).
    Bench {
        /// Also append the figures to docs/benchmarks.md.
        #[arg(long)]
        record: bool,
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Setup { install_docker } => setup::run(&root, install_docker),
        Task::Test {
            no_setup,
            cargo_args,
        } => test(&root, no_setup, &cargo_args),
        Task::Up => up(&root),
        Task::Down => down(&root),
        Task::Bench { what, record } => bench::run(&root, what, record),
    }
}

fn test(root: &Path, no_setup: bool, cargo_args: &[String]) -> Result<()> {
    if !no_setup {
        setup::run(root, false)?;
    }
    step("format check (nightly rustfmt)");
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--all", "--check"])
        .current_dir(root))?;
    // The eBPF crate is its own workspace (it targets bpfel), so `--all` skips it.
    run(Command::new("cargo")
        .args([
            "+nightly",
            "fmt",
            "--check",
            "--manifest-path",
            "ployz-ebpf/Cargo.toml",
        ])
        .current_dir(root))?;
    step("clippy -D warnings");
    run(cargo(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("tests");
    run(cargo(root).args(["test", "--workspace"]).args(cargo_args))?;
    step("all checks passed");
    Ok(())
}

/// The dev cluster's paths: everything under target/ployz-dev.
struct DevPaths {
    socket: PathBuf,
    data_dir: PathBuf,
}

impl DevPaths {
    fn new(root: &Path) -> Self {
        let base = root.join("target/ployz-dev");
        Self {
            socket: base.join("ployzd.sock"),
            data_dir: base.join("data"),
        }
    }
}

fn up(root: &Path) -> Result<()> {
    step("building ployzd, ployzctl, the gateway and DNS");
    run(cargo(root).args([
        "build",
        "--package",
        "ployzd",
        "--package",
        "ployzctl",
        "--package",
        "ployz-gateway",
        "--package",
        "ployz-dns",
    ]))?;
    let paths = DevPaths::new(root);
    let ployzctl = root.join("target/debug/ployzctl");
    let socket = paths.socket.display().to_string();
    let data_dir = paths.data_dir.display().to_string();
    let ctl = || {
        let mut command = Command::new(&ployzctl);
        command.args(["--socket", &socket]);
        command
    };

    step("building the example image (busybox, no registry needed)");
    ployz_tests::image::ensure_example_image(EXAMPLE_IMAGE)?;

    step("starting ployzd");
    let mut install = ctl();
    install.args([
        "daemon",
        "install",
        "--runtime",
        "host",
        "--service-mode",
        "user",
        "--data-dir",
        &data_dir,
        // Dev ports, so a host's own web server and resolver keep 80 and 53.
        "--gateway-http",
        DEV_HTTP,
        "--gateway-https",
        DEV_HTTPS,
        "--dns-listen",
        DEV_DNS,
    ]);
    // Snapshots (rollback with volume data) need btrfs; a loop-file pool needs root.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        install.args(["--storage-backend", "btrfs", "--storage-loop-size", "1GiB"]);
    } else {
        println!("not root: volumes use the dir backend (no snapshots); run as root for btrfs");
    }
    run(&mut install)?;
    step("founding network `dev`");
    run(ctl().args(["mesh", "init", "dev"]))?;
    step("deploying examples/hello.toml");
    let manifest = root.join("examples/hello.toml").display().to_string();
    let deployed = ctl().args(["--json", "deploy", "-f", &manifest]).output()?;
    if !deployed.status.success() {
        bail!(
            "deploy failed: {}",
            String::from_utf8_lossy(&deployed.stderr).trim()
        );
    }
    step("status");
    run(ctl().arg("status"))?;
    println!(
        "\nA single-machine Ployz cluster is running and serves the example app:\n  \
         curl -H 'Host: hello.localhost' http://{DEV_HTTP}/\n  \
         dig @127.0.0.1 -p {DEV_DNS_PORT} web.hello.ployz.internal\n\
         Talk to it with:\n  \
         export PLOYZ_SOCKET={socket}\n  \
         target/debug/ployzctl deploy history hello\n  \
         target/debug/ployzctl op ls\n\
         Stop everything with `cargo xtask down`."
    );
    Ok(())
}

/// Where `cargo xtask up` runs the gateway and DNS.
const DEV_HTTP: &str = "127.0.0.1:8080";
const DEV_HTTPS: &str = "127.0.0.1:8443";
const DEV_DNS: &str = "127.0.0.1:5353";
const DEV_DNS_PORT: u16 = 5353;

/// The image examples/hello.toml runs.
const EXAMPLE_IMAGE: &str = "ployz-example:latest";

fn down(root: &Path) -> Result<()> {
    let paths = DevPaths::new(root);
    let ployzctl = root.join("target/debug/ployzctl");
    if !ployzctl.exists() {
        bail!(
            "{} is not built; nothing was started by `cargo xtask up`",
            ployzctl.display()
        );
    }
    let socket = paths.socket.display().to_string();
    // Workloads outlive the daemon by design; `down` removes the example's explicitly.
    let containers = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=ployz.namespace=hello"])
        .output()?;
    for id in String::from_utf8_lossy(&containers.stdout).split_whitespace() {
        run(Command::new("docker").args(["rm", "-f", id]))?;
    }
    run(Command::new(&ployzctl).args(["--socket", &socket, "daemon", "stop", "--services"]))?;
    let pool = paths.data_dir.join("pool");
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|mounts| {
            mounts
                .lines()
                .any(|line| line.split(' ').nth(1) == Some(&*pool.to_string_lossy()))
        })
        .unwrap_or(false);
    if mounted {
        run(Command::new("umount").arg(&pool))?;
    }
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

/// Runs `command`, failing with its exit status.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", command);
    }
    Ok(())
}

pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask lives one level below the workspace root")
}
