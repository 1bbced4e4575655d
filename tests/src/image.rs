//! The workload image tests run, made without a registry: a rootfs holding
//! Debian's static busybox (`busybox-static`, installed by `cargo xtask setup`)
//! and a symlink per applet (`sh`, `httpd`, `sleep`, `wget`, `nc`, …), turned
//! into an image by `docker import`. Building is idempotent and safe when many
//! tests and test processes ask for it at once.

use std::{
    fs::{self, File, Permissions},
    os::unix::{fs::PermissionsExt, io::AsRawFd},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The busybox binary the image is made of; it must be statically linked.
const BUSYBOX: &str = "/bin/busybox";

/// Recorded in the image's environment; bump it when the image's contents
/// change, so an existing older image under the same tag is rebuilt.
const IMAGE_VERSION: &str = "PLOYZ_EXAMPLE_IMAGE=1";

/// Serializes builds across threads and processes on this machine.
const LOCK_PATH: &str = "/tmp/ployz-example-image.lock";

/// Makes sure the Docker engine has the busybox example image under `tag`
/// (e.g. `ployz-example:test`), building it when it is absent or outdated.
/// Its default command is `/bin/sh`; `/tmp` and `/www` exist.
pub fn ensure_example_image(tag: &str) -> Result<()> {
    if image_is_current(tag)? {
        return Ok(());
    }
    let _lock = BuildLock::acquire()?;
    // Another caller may have built it while we waited for the lock.
    if image_is_current(tag)? {
        return Ok(());
    }
    build(tag)
}

/// True when `tag` exists and was built from this version of the recipe.
fn image_is_current(tag: &str) -> Result<bool> {
    let output = Command::new("docker")
        .args(["image", "inspect", "--format", "{{json .Config.Env}}", tag])
        .output()
        .context("run `docker image inspect` (is the docker CLI installed?)")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("No such image") {
            return Ok(false);
        }
        bail!("docker image inspect {tag} failed: {}", stderr.trim());
    }
    let env: Option<Vec<String>> =
        serde_json::from_slice(&output.stdout).context("parse the image's environment")?;
    Ok(env
        .unwrap_or_default()
        .iter()
        .any(|entry| entry == IMAGE_VERSION))
}

fn build(tag: &str) -> Result<()> {
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        bail!("{BUSYBOX} is missing: install Debian's busybox-static (`cargo xtask setup`)");
    }
    let work = tempfile::Builder::new()
        .prefix("ployz-example-image-")
        .tempdir()
        .context("create a build directory")?;
    let root = work.path().join("rootfs");
    let bin = root.join("bin");
    fs::create_dir_all(&bin).context("create rootfs/bin")?;
    for dir in ["tmp", "www"] {
        fs::create_dir(root.join(dir)).with_context(|| format!("create rootfs/{dir}"))?;
    }
    fs::set_permissions(root.join("tmp"), Permissions::from_mode(0o1777))
        .context("make rootfs/tmp world-writable")?;
    fs::copy(busybox, bin.join("busybox")).context("copy busybox into the rootfs")?;

    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("run `busybox --list`")?;
    if !list.status.success() {
        bail!(
            "busybox --list failed: {}",
            String::from_utf8_lossy(&list.stderr).trim()
        );
    }
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .with_context(|| format!("link applet {applet}"))?;
        }
    }

    let tarball = work.path().join("rootfs.tar");
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(&tarball)
        .arg("--directory")
        .arg(&root)
        .args(["--owner=0", "--group=0", "--numeric-owner", "."]))?;
    // The import tags the image only once it is complete, so a crash leaves
    // no half-made image behind.
    run(Command::new("docker")
        .arg("import")
        .args(["--change", r#"CMD ["/bin/sh"]"#])
        .args(["--change", &format!("ENV {IMAGE_VERSION}")])
        .arg(&tarball)
        .arg(tag))?;
    Ok(())
}

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// An exclusive `flock` on [`LOCK_PATH`], released when dropped (or when the
/// process dies). Each acquisition opens the file anew, so threads of one
/// process exclude each other too.
struct BuildLock {
    file: File,
}

impl BuildLock {
    fn acquire() -> Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .with_context(|| format!("open {LOCK_PATH}"))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("lock the image build");
        }
        Ok(Self { file })
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor we still own; closing it would too.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}
