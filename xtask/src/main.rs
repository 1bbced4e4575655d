//! Developer workflows for Ployz, in Rust so a contributor needs only cargo:
//!
//! - `cargo xtask setup`: install what Ployz and its tests need (idempotent).
//! - `cargo xtask test`: setup, format check, clippy, every test. CI runs this.
//! - `cargo xtask up`: start a single-machine cluster from this checkout.
//! - `cargo xtask down`: stop it, sidecars included.

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
    /// Start a single-machine cluster (daemon + NATS) under target/ployz-dev and show its status.
    Up,
    /// Stop the cluster started by `up`, NATS included.
    Down,
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
    step("building ployzd and ployzctl");
    run(cargo(root).args(["build", "--package", "ployzd", "--package", "ployzctl"]))?;
    let paths = DevPaths::new(root);
    let ployzctl = root.join("target/debug/ployzctl");
    let socket = paths.socket.display().to_string();
    let data_dir = paths.data_dir.display().to_string();

    step("starting ployzd");
    run(Command::new(&ployzctl).args([
        "--socket",
        &socket,
        "daemon",
        "install",
        "--runtime",
        "host",
        "--service-mode",
        "user",
        "--data-dir",
        &data_dir,
    ]))?;
    step("founding network `dev`");
    run(Command::new(&ployzctl).args(["--socket", &socket, "mesh", "init", "dev"]))?;
    step("status");
    run(Command::new(&ployzctl).args(["--socket", &socket, "status"]))?;
    println!(
        "\nA single-machine Ployz cluster is running. Talk to it with:\n  \
         export PLOYZ_SOCKET={socket}\n  \
         target/debug/ployzctl status\n  \
         target/debug/ployzctl machine ls\n  \
         target/debug/ployzctl op ls\n\
         Stop it (NATS too) with `cargo xtask down`."
    );
    Ok(())
}

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
    run(Command::new(&ployzctl).args(["--socket", &socket, "daemon", "stop", "--services"]))
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
