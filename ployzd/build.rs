//! Builds the eBPF object that `mesh::ebpf` embeds: the `ployz-ebpf` crate, for
//! `bpfel-unknown-none`, through aya-build. When this machine lacks the eBPF
//! toolchain (or `PLOYZ_EBPF=off`), ployzd still builds: the script emits no
//! `ployz_ebpf` cfg and records the one-line reason in `PLOYZ_EBPF_UNAVAILABLE`,
//! which the daemon reports as "eBPF data path unavailable: <reason>".
//!
//! Reruns are driven by the eBPF sources, `PLOYZ_EBPF` and the toolchain files
//! probed below, never by `PATH`, so an ordinary `cargo test` does not rebuild
//! ployzd.

use std::{
    env,
    ffi::OsStr,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya_build::{Package, Toolchain};

/// Set as `--cfg ployz_ebpf` when `OUT_DIR/ployz-datapath` holds the built object.
const EBPF_CFG: &str = "ployz_ebpf";
/// Compile-time variable carrying why the object is absent.
const UNAVAILABLE_ENV: &str = "PLOYZ_EBPF_UNAVAILABLE";
/// `PLOYZ_EBPF=off` builds without the object even where the toolchain exists.
const SWITCH_ENV: &str = "PLOYZ_EBPF";
/// The eBPF crate, next to ployzd and excluded from the workspace.
const EBPF_PACKAGE: &str = "ployz-ebpf";
/// The crate's one binary: the object file holding every program.
const EBPF_OBJECT: &str = "ployz-datapath";
/// aya-build compiles with `-Z build-std=core`, so it runs the nightly toolchain.
const EBPF_TOOLCHAIN: &str = "nightly";
/// The hint every "missing toolchain" reason ends with.
const SETUP_HINT: &str = "run `cargo xtask setup`";

fn main() -> Result<()> {
    println!("cargo::rustc-check-cfg=cfg({EBPF_CFG})");
    println!("cargo::rerun-if-env-changed={SWITCH_ENV}");

    if let Some(value) = env::var_os(SWITCH_ENV)
        && is_off(&value)
    {
        return unavailable(&format!(
            "disabled at build time by {SWITCH_ENV}={}",
            value.display()
        ));
    }
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return unavailable("eBPF needs a Linux target");
    }

    let toolchain = match probe_toolchain() {
        Ok(toolchain) => toolchain,
        Err(missing) => {
            if let Some(watch) = missing.watch.filter(|path| path.exists()) {
                println!("cargo::rerun-if-changed={}", watch.display());
            }
            return unavailable(&missing.reason);
        }
    };
    for watched in [&toolchain.bpf_linker, &toolchain.components] {
        println!("cargo::rerun-if-changed={}", watched.display());
    }

    build_ebpf()?;
    println!("cargo::rustc-cfg={EBPF_CFG}");
    Ok(())
}

/// Whether `PLOYZ_EBPF` asks to leave the eBPF object out.
fn is_off(value: &OsStr) -> bool {
    ["off", "0", "false", "no"]
        .iter()
        .any(|off| value.eq_ignore_ascii_case(off))
}

/// Records that this build carries no eBPF object, and why.
fn unavailable(reason: &str) -> Result<()> {
    // Cargo reads one directive per line: keep the reason on one.
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    println!("cargo::rustc-env={UNAVAILABLE_ENV}={reason}");
    println!("cargo::warning=eBPF data path unavailable: {reason}");
    Ok(())
}

/// The pieces of the eBPF toolchain that were found, watched for changes.
struct FoundToolchain {
    /// The `bpf-linker` binary on `PATH`.
    bpf_linker: PathBuf,
    /// The nightly sysroot's component list; `rustup` rewrites it when
    /// components or the toolchain change.
    components: PathBuf,
}

/// Why the eBPF object cannot be built here.
struct Missing {
    /// One line for `PLOYZ_EBPF_UNAVAILABLE`.
    reason: String,
    /// A path whose change may mean the toolchain arrived (watched if it exists).
    watch: Option<PathBuf>,
}

/// Checks, cheaply and before building anything, that everything aya-build needs
/// is installed: a working `bpf-linker` on `PATH`, `rustup`, the nightly
/// toolchain and its `rust-src`. A build failure after these checks passed is a
/// bug in `ployz-ebpf` and fails the build.
fn probe_toolchain() -> Result<FoundToolchain, Missing> {
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"));
    let Some(bpf_linker) = find_on_path("bpf-linker") else {
        return Err(Missing {
            reason: format!("bpf-linker is not on PATH ({SETUP_HINT})"),
            watch: cargo_bin,
        });
    };
    if !runs(Command::new(&bpf_linker).arg("--version")) {
        return Err(Missing {
            reason: format!(
                "{} --version fails (is LLVM 22 installed? {SETUP_HINT})",
                bpf_linker.display()
            ),
            watch: Some(bpf_linker),
        });
    }

    let rustup_home = env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".rustup")));
    let sysroot = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Err(Missing {
            reason: format!(
                "the {EBPF_TOOLCHAIN} Rust toolchain is not installed through rustup \
                 ({SETUP_HINT})"
            ),
            watch: rustup_home.map(|home| home.join("update-hashes")),
        });
    };
    let components = sysroot.join("lib/rustlib/components");
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
    {
        return Err(Missing {
            reason: format!("rust-src is not installed for {EBPF_TOOLCHAIN} ({SETUP_HINT})"),
            watch: Some(components),
        });
    }

    Ok(FoundToolchain {
        bpf_linker,
        components,
    })
}

/// Builds `ployz-ebpf` into `OUT_DIR/ployz-datapath`.
fn build_ebpf() -> Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("cargo sets CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("ployzd sits inside the workspace root")?;
    let ebpf_dir = root.join(EBPF_PACKAGE);
    let common_dir = root.join("ployz-ebpf-common");
    // aya-build watches the eBPF crate itself; the shared types are a path
    // dependency of that crate, so watch them too.
    for watched in [common_dir.join("src"), common_dir.join("Cargo.toml")] {
        println!("cargo::rerun-if-changed={}", watched.display());
    }
    let ebpf_dir_str = ebpf_dir
        .to_str()
        .context("the eBPF crate's path is UTF-8")?;

    // aya-build runs `cargo build --package ployz-ebpf` in the current directory;
    // the crate is its own workspace, so run it from there.
    env::set_current_dir(&ebpf_dir).with_context(|| format!("entering {}", ebpf_dir.display()))?;
    // SAFETY: the build script is single-threaded here (aya-build spawns its
    // reader thread later), so nothing reads the environment concurrently.
    // Quiet keeps cargo's progress lines out of the outer build's warnings;
    // compiler errors and warnings still come through.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    let started = Instant::now();
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir_str,
            ..Package::default()
        }],
        Toolchain::Nightly,
    )
    .context(
        "building ployz-ebpf failed although the eBPF toolchain is installed (the compiler \
         output is in the warnings above); PLOYZ_EBPF=off builds ployzd without it",
    )?;

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("cargo sets OUT_DIR")?);
    let object = out_dir.join(EBPF_OBJECT);
    let size = fs::metadata(&object)
        .with_context(|| format!("aya-build left no object at {}", object.display()))?
        .len();
    if size == 0 {
        bail!("aya-build left an empty object at {}", object.display());
    }
    // Visible with `cargo build -vv`; the plain output stays quiet on success.
    println!(
        "built {EBPF_OBJECT} ({size} bytes) in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The first executable file named `name` in a `PATH` directory.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Whether `command` starts and exits successfully.
fn runs(command: &mut Command) -> bool {
    command.output().is_ok_and(|output| output.status.success())
}
