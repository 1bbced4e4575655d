//! btrfs volumes: every volume is a subvolume at
//! `<pool>/volumes/<namespace>/<name>`, every snapshot a read-only subvolume at
//! `<pool>/snapshots/<namespace>/<name>/<snapshot>`. Drives the `btrfs` CLI and
//! reads subvolume facts with one ioctl. [`BtrfsPool`] provisions a
//! loop-mounted filesystem for development and tests. Depends on nothing
//! outside `storage`.

use std::{
    ffi::CString,
    io,
    mem::MaybeUninit,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use super::{
    Capabilities, SendStream, Snapshot, SnapshotName, StorageError, Volume, VolumeBackend,
    VolumeName, mountinfo,
    process::{BrokenInput, Invocation},
};

/// Volumes as btrfs subvolumes under one pool directory.
///
/// Operations on one volume must not run concurrently (deploy serializes
/// them); operations on different volumes may.
#[derive(Clone, Debug)]
pub struct BtrfsVolumes {
    pool: PathBuf,
}

impl BtrfsVolumes {
    /// Opens the pool at `pool_dir`, which must be a directory on a btrfs
    /// filesystem, and creates its `volumes`, `snapshots` and `staging` folders.
    pub fn open(pool_dir: impl AsRef<Path>) -> Result<Self, StorageError> {
        let pool_dir = pool_dir.as_ref();
        let pool = std::fs::canonicalize(pool_dir).map_err(|source| StorageError::Io {
            path: pool_dir.to_owned(),
            source,
        })?;
        if !pool.is_dir() {
            return Err(StorageError::Pool {
                path: pool,
                reason: "not a directory".to_owned(),
            });
        }
        let magic = filesystem_magic(&pool).map_err(|source| StorageError::Io {
            path: pool.clone(),
            source,
        })?;
        if magic != libc::BTRFS_SUPER_MAGIC {
            return Err(StorageError::Pool {
                path: pool,
                reason: format!(
                    "not on a btrfs filesystem (filesystem magic {magic:#x}); mount a btrfs \
                     filesystem there, e.g. with `BtrfsPool::create_loop`"
                ),
            });
        }
        for folder in [VOLUMES, SNAPSHOTS, STAGING] {
            let path = pool.join(folder);
            std::fs::create_dir_all(&path).map_err(|source| StorageError::Io { path, source })?;
        }
        Ok(Self { pool })
    }

    /// The pool directory this backend manages.
    pub fn pool_dir(&self) -> &Path {
        &self.pool
    }

    fn volume_path(&self, volume: &VolumeName) -> PathBuf {
        self.pool
            .join(VOLUMES)
            .join(&volume.namespace)
            .join(&volume.name)
    }

    fn snapshot_dir(&self, volume: &VolumeName) -> PathBuf {
        self.pool
            .join(SNAPSHOTS)
            .join(&volume.namespace)
            .join(&volume.name)
    }

    fn snapshot_path(&self, volume: &VolumeName, snapshot: &SnapshotName) -> PathBuf {
        self.snapshot_dir(volume).join(snapshot.as_str())
    }

    fn staging_path(&self, purpose: &str) -> PathBuf {
        self.pool
            .join(STAGING)
            .join(format!("{purpose}-{}", uuid::Uuid::now_v7().simple()))
    }

    async fn require_volume(&self, volume: &VolumeName) -> Result<PathBuf, StorageError> {
        let path = self.volume_path(volume);
        if is_subvolume(&path).await? {
            Ok(path)
        } else {
            Err(StorageError::NoSuchVolume {
                volume: volume.to_string(),
            })
        }
    }

    /// The path of `volume@snapshot`: [`StorageError::NoSuchVolume`] or
    /// [`StorageError::NoSuchSnapshot`] when either is missing.
    async fn require_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<PathBuf, StorageError> {
        let path = self.snapshot_path(volume, snapshot);
        if is_subvolume(&path).await? {
            return Ok(path);
        }
        self.require_volume(volume).await?;
        Err(no_such_snapshot(volume, snapshot))
    }

    async fn snapshot_info(
        &self,
        volume: &VolumeName,
        name: &SnapshotName,
    ) -> Result<Snapshot, StorageError> {
        let path = self.snapshot_path(volume, name);
        let info = subvolume_info(&path).map_err(|source| StorageError::Io { path, source })?;
        Ok(Snapshot {
            volume: volume.clone(),
            name: name.clone(),
            created_at_unix_ms: info.created_at_unix_ms,
        })
    }

    /// Makes `volume`'s live subvolume a writable snapshot of `source`.
    ///
    /// The new content is prepared in staging and swapped in with one atomic
    /// `renameat2(RENAME_EXCHANGE)`, so the live path always holds either the
    /// old or the new content; the old one is then deleted.
    async fn replace_live(&self, volume: &VolumeName, source: &Path) -> Result<(), StorageError> {
        let live = self.volume_path(volume);
        let staged = self.staging_path("replace");
        subvolume_snapshot(source, &staged, Access::Writable).await?;
        if let Err(source) = exchange(&staged, &live) {
            delete_subvolumes(&[staged]).await?;
            return Err(StorageError::Io { path: live, source });
        }
        if let Err(error) = delete_subvolumes(std::slice::from_ref(&staged)).await {
            // The volume already holds the new content; the old one is garbage.
            tracing::warn!(
                volume = %volume,
                leftover = %staged.display(),
                error = %crate::error_chain(&error),
                "cannot delete a replaced volume's old content"
            );
        }
        Ok(())
    }
}

const VOLUMES: &str = "volumes";
const SNAPSHOTS: &str = "snapshots";
const STAGING: &str = "staging";

impl VolumeBackend for BtrfsVolumes {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshots: true,
            clones: true,
            send_receive: true,
        }
    }

    async fn create(&self, volume: &VolumeName) -> Result<Volume, StorageError> {
        let path = self.volume_path(volume);
        if is_subvolume(&path).await? {
            return Err(already_exists(volume));
        }
        create_parent(&path).await?;
        if let Err(error) = Invocation::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&path)
            .run()
            .await
        {
            // Lost a race with another create of the same volume.
            if is_subvolume(&path).await? {
                return Err(already_exists(volume));
            }
            return Err(error);
        }
        Ok(Volume {
            name: volume.clone(),
            path,
        })
    }

    async fn get(&self, volume: &VolumeName) -> Result<Option<Volume>, StorageError> {
        let path = self.volume_path(volume);
        Ok(is_subvolume(&path).await?.then(|| Volume {
            name: volume.clone(),
            path,
        }))
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        let root = self.pool.join(VOLUMES);
        let mut volumes = Vec::new();
        for namespace in super::subdirectories(&root).await? {
            for name in super::subdirectories(&root.join(&namespace)).await? {
                let Ok(volume) = VolumeName::new(&namespace, &name) else {
                    continue;
                };
                if let Some(found) = self.get(&volume).await? {
                    volumes.push(found);
                }
            }
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    async fn destroy(&self, volume: &VolumeName) -> Result<(), StorageError> {
        // Snapshots first: an interrupted destroy leaves a volume that a retry
        // finishes, never snapshots without their volume.
        let snapshot_dir = self.snapshot_dir(volume);
        let mut doomed = Vec::new();
        for name in super::subdirectories(&snapshot_dir).await? {
            let path = snapshot_dir.join(name);
            if is_subvolume(&path).await? {
                doomed.push(path);
            }
        }
        delete_subvolumes(&doomed).await?;
        match tokio::fs::remove_dir_all(&snapshot_dir).await {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::Io {
                    path: snapshot_dir,
                    source,
                });
            }
        }
        let live = self.volume_path(volume);
        if is_subvolume(&live).await? {
            delete_subvolumes(&[live]).await?;
        }
        Ok(())
    }

    async fn snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<Snapshot, StorageError> {
        let live = self.require_volume(volume).await?;
        let path = self.snapshot_path(volume, snapshot);
        if exists(&path).await? {
            return Err(snapshot_exists(volume, snapshot));
        }
        create_parent(&path).await?;
        subvolume_snapshot(&live, &path, Access::ReadOnly).await?;
        self.snapshot_info(volume, snapshot).await
    }

    async fn snapshots(&self, volume: &VolumeName) -> Result<Vec<Snapshot>, StorageError> {
        self.require_volume(volume).await?;
        let dir = self.snapshot_dir(volume);
        let mut found = Vec::new();
        for entry in super::subdirectories(&dir).await? {
            let Ok(name) = SnapshotName::new(&entry) else {
                continue;
            };
            let path = dir.join(&entry);
            if !is_subvolume(&path).await? {
                continue;
            }
            let info = subvolume_info(&path).map_err(|source| StorageError::Io { path, source })?;
            // A receive in progress is still writable: not a snapshot yet.
            if info.read_only {
                found.push((
                    info.id,
                    Snapshot {
                        volume: volume.clone(),
                        name,
                        created_at_unix_ms: info.created_at_unix_ms,
                    },
                ));
            }
        }
        // Subvolume ids only grow, so they order snapshots by creation exactly.
        found.sort_by_key(|(id, _)| *id);
        Ok(found.into_iter().map(|(_, snapshot)| snapshot).collect())
    }

    async fn destroy_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        let path = self.snapshot_path(volume, snapshot);
        if is_subvolume(&path).await? {
            delete_subvolumes(&[path]).await?;
        }
        Ok(())
    }

    async fn clone_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        target: &VolumeName,
    ) -> Result<Volume, StorageError> {
        let source = self.require_snapshot(volume, snapshot).await?;
        let path = self.volume_path(target);
        if exists(&path).await? {
            return Err(already_exists(target));
        }
        create_parent(&path).await?;
        subvolume_snapshot(&source, &path, Access::Writable).await?;
        Ok(Volume {
            name: target.clone(),
            path,
        })
    }

    async fn rollback(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        let source = self.require_snapshot(volume, snapshot).await?;
        self.replace_live(volume, &source).await
    }

    async fn send(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        base: Option<&SnapshotName>,
    ) -> Result<SendStream, StorageError> {
        let source = self.require_snapshot(volume, snapshot).await?;
        let mut send = Invocation::new("btrfs").args(["send", "-q"]);
        if let Some(base) = base {
            send = send
                .arg("-p")
                .arg(self.require_snapshot(volume, base).await?);
        }
        send.arg(source).spawn_stream()
    }

    /// Receives into the volume's snapshot folder (btrfs cannot move a
    /// read-only subvolume to another folder, and re-snapshotting it would lose
    /// the received UUID that later incremental receives look up), renames the
    /// result to `snapshot`, and makes the live volume a writable snapshot of it.
    /// A full stream into an existing volume replaces its live content too.
    async fn receive(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        stream: SendStream,
    ) -> Result<Snapshot, StorageError> {
        let target = self.snapshot_path(volume, snapshot);
        if exists(&target).await? {
            return Err(snapshot_exists(volume, snapshot));
        }
        let dir = self.snapshot_dir(volume);
        let created_dir = !exists(&dir).await?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| StorageError::Io {
                path: dir.clone(),
                source,
            })?;
        let before = super::subdirectories(&dir).await?;
        let received = Invocation::new("btrfs")
            .args(["receive", "-e"])
            .arg(&dir)
            .feed(stream, &target, BrokenInput::KillReceiver)
            .await;
        let after = super::subdirectories(&dir).await?;
        let new: Vec<String> = after
            .into_iter()
            .filter(|entry| !before.contains(entry))
            .collect();
        let output = match received {
            Ok(output) => output,
            Err(error) => {
                // Whatever the broken receive created is partial.
                let partial: Vec<PathBuf> = new.iter().map(|entry| dir.join(entry)).collect();
                if let Err(cleanup) = delete_subvolumes(&partial).await {
                    tracing::warn!(
                        volume = %volume,
                        error = %crate::error_chain(&cleanup),
                        "cannot delete a partially received snapshot"
                    );
                } else if created_dir && let Err(cleanup) = tokio::fs::remove_dir(&dir).await {
                    tracing::warn!(volume = %volume, error = %cleanup, "cannot remove a snapshot folder");
                }
                return Err(error);
            }
        };
        let received_name = output
            .stderr
            .lines()
            .filter_map(|line| {
                line.strip_prefix("At subvol ")
                    .or_else(|| line.strip_prefix("At snapshot "))
            })
            .next_back()
            .map(str::to_owned)
            .or_else(|| (new.len() == 1).then(|| new[0].clone()))
            .ok_or_else(|| StorageError::Command {
                command: format!("btrfs receive -e {}", dir.display()),
                stderr: format!(
                    "cannot tell which subvolume was received: {}",
                    output.stderr.trim()
                ),
            })?;
        let received = dir.join(&received_name);
        if received != target {
            // Same folder, so this works on a read-only subvolume and keeps its received UUID.
            if let Err(source) = tokio::fs::rename(&received, &target).await {
                delete_subvolumes(&[received]).await?;
                return Err(StorageError::Io {
                    path: target,
                    source,
                });
            }
        }
        let live = self.volume_path(volume);
        if is_subvolume(&live).await? {
            self.replace_live(volume, &target).await?;
        } else {
            create_parent(&live).await?;
            subvolume_snapshot(&target, &live, Access::Writable).await?;
        }
        self.snapshot_info(volume, snapshot).await
    }
}

fn already_exists(volume: &VolumeName) -> StorageError {
    StorageError::AlreadyExists {
        volume: volume.to_string(),
    }
}

fn snapshot_exists(volume: &VolumeName, snapshot: &SnapshotName) -> StorageError {
    StorageError::SnapshotExists {
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
    }
}

fn no_such_snapshot(volume: &VolumeName, snapshot: &SnapshotName) -> StorageError {
    StorageError::NoSuchSnapshot {
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
    }
}

async fn exists(path: &Path) -> Result<bool, StorageError> {
    tokio::fs::try_exists(path)
        .await
        .map_err(|source| StorageError::Io {
            path: path.to_owned(),
            source,
        })
}

async fn create_parent(path: &Path) -> Result<(), StorageError> {
    let parent = path.parent().expect("pool paths have a parent");
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|source| StorageError::Io {
            path: parent.to_owned(),
            source,
        })
}

/// The inode number of every subvolume's root directory.
const SUBVOLUME_ROOT_INODE: u64 = 256;

/// Whether `path` is the root of a subvolume (not a plain directory).
async fn is_subvolume(path: &Path) -> Result<bool, StorageError> {
    match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => Ok(metadata.is_dir() && metadata.ino() == SUBVOLUME_ROOT_INODE),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StorageError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    Writable,
}

async fn subvolume_snapshot(
    source: &Path,
    target: &Path,
    access: Access,
) -> Result<(), StorageError> {
    let mut command = Invocation::new("btrfs").args(["subvolume", "snapshot"]);
    if access == Access::ReadOnly {
        command = command.arg("-r");
    }
    command.arg(source).arg(target).run().await.map(drop)
}

async fn delete_subvolumes(paths: &[PathBuf]) -> Result<(), StorageError> {
    if paths.is_empty() {
        return Ok(());
    }
    Invocation::new("btrfs")
        .args(["subvolume", "delete"])
        .args(paths)
        .run()
        .await
        .map(drop)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn filesystem_magic(path: &Path) -> io::Result<libc::c_long> {
    let c_path = c_path(path)?;
    let mut stat = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `stat` points
    // to writable memory for one `statfs`, which the call fills on success.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type)
}

/// Atomically swaps two paths on one filesystem.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let a = c_path(a)?;
    let b = c_path(b)?;
    // SAFETY: both paths are NUL-terminated and outlive the call; with
    // AT_FDCWD they are resolved like `rename(2)` paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct btrfs_ioctl_timespec` from `linux/btrfs.h`.
#[repr(C)]
struct IoctlTimespec {
    sec: u64,
    nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args` from `linux/btrfs.h`.
#[repr(C)]
struct GetSubvolInfoArgs {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: IoctlTimespec,
    otime: IoctlTimespec,
    stime: IoctlTimespec,
    rtime: IoctlTimespec,
    reserved: [u64; 8],
}

const _: () = assert!(
    size_of::<GetSubvolInfoArgs>() == 504,
    "must match the kernel's struct"
);

/// `_IOR(BTRFS_IOCTL_MAGIC, 60, struct btrfs_ioctl_get_subvol_info_args)`.
const BTRFS_IOC_GET_SUBVOL_INFO: libc::Ioctl = 0x81F8_943C;

/// `BTRFS_ROOT_SUBVOL_RDONLY` in a root item's flags.
const BTRFS_ROOT_SUBVOL_RDONLY: u64 = 1;

struct SubvolumeInfo {
    /// The subvolume's tree id; ids only grow within a filesystem.
    id: u64,
    created_at_unix_ms: u64,
    read_only: bool,
}

/// Facts about the subvolume whose root is `path` (Linux 4.18+).
fn subvolume_info(path: &Path) -> io::Result<SubvolumeInfo> {
    let file = std::fs::File::open(path)?;
    let mut args = MaybeUninit::<GetSubvolInfoArgs>::zeroed();
    // SAFETY: `file` is an open descriptor for the duration of the call and
    // `args` is writable memory of exactly the size this ioctl number encodes.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            BTRFS_IOC_GET_SUBVOL_INFO,
            args.as_mut_ptr(),
        )
    };
    // The kernel returns a positive value (a B-tree search's "not an exact
    // match") for most subvolumes while filling the struct: only negative fails.
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the struct is plain integers, valid when zeroed, and the ioctl
    // succeeded, so the kernel filled it in.
    let args = unsafe { args.assume_init() };
    Ok(SubvolumeInfo {
        id: args.treeid,
        created_at_unix_ms: args.otime.sec * 1000 + u64::from(args.otime.nsec) / 1_000_000,
        read_only: args.flags & BTRFS_ROOT_SUBVOL_RDONLY != 0,
    })
}

/// A btrfs filesystem in an image file, loop-mounted for development and
/// tests. Dropping it unmounts it and deletes the image.
#[derive(Debug)]
pub struct BtrfsPool {
    image_file: PathBuf,
    mount_point: PathBuf,
    /// False once unmounted or handed over with [`BtrfsPool::keep_mounted`].
    armed: bool,
}

/// The smallest image `mkfs.btrfs` accepts with its default profiles (109 MiB).
pub const BTRFS_MIN_POOL_BYTES: u64 = 109 * 1024 * 1024;

impl BtrfsPool {
    /// Creates a sparse `size`-byte image at `image_file` (which must not
    /// exist), formats it and mounts it at `mount_point` through a loop device
    /// with autoclear, so the device detaches when the last mount goes away.
    pub fn create_loop(
        image_file: &Path,
        size: u64,
        mount_point: &Path,
    ) -> Result<Self, StorageError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| StorageError::Io { path, source }
        };
        let image = std::fs::File::create_new(image_file).map_err(io_error(image_file))?;
        // From here on, a failure removes the image again.
        let result = (|| {
            image.set_len(size).map_err(io_error(image_file))?;
            drop(image);
            Invocation::new("mkfs.btrfs")
                .arg("-q")
                .arg(image_file)
                .run_blocking()?;
            std::fs::create_dir_all(mount_point).map_err(io_error(mount_point))?;
            Invocation::new("mount")
                .args(["-o", "loop"])
                .arg(image_file)
                .arg(mount_point)
                .run_blocking()
        })();
        match result {
            Ok(_) => Ok(Self {
                image_file: image_file.to_owned(),
                mount_point: mount_point.to_owned(),
                armed: true,
            }),
            Err(error) => {
                if let Err(cleanup) = std::fs::remove_file(image_file) {
                    tracing::warn!(image = %image_file.display(), error = %cleanup, "cannot remove a pool image");
                }
                Err(error)
            }
        }
    }

    /// Where the filesystem is mounted; pass it to [`BtrfsVolumes::open`].
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// The image file backing the filesystem.
    pub fn image_file(&self) -> &Path {
        &self.image_file
    }

    /// Unmounts the filesystem and deletes the image, reporting failures.
    pub fn unmount(mut self) -> Result<(), StorageError> {
        self.armed = false;
        self.teardown()
    }

    /// Leaves the filesystem mounted and the image in place (for a dev
    /// cluster that outlives this process); returns the mount point.
    pub fn keep_mounted(mut self) -> PathBuf {
        self.armed = false;
        self.mount_point.clone()
    }

    fn teardown(&self) -> Result<(), StorageError> {
        // Another mount namespace or a just-exited process may still hold the
        // filesystem for a moment: retry, then detach lazily. The loop device
        // has autoclear, so it detaches whenever the last user lets go.
        let umount = Invocation::new("umount").arg(&self.mount_point);
        let mut attempt = 0;
        loop {
            match umount.run_blocking() {
                Ok(_) => break,
                Err(error) if !mountinfo::is_mount_point(&self.mount_point) => {
                    tracing::debug!(error = %error, "umount failed on a path that is not mounted");
                    break;
                }
                Err(_) if attempt < 10 => {
                    attempt += 1;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(_) => {
                    Invocation::new("umount")
                        .arg("--lazy")
                        .arg(&self.mount_point)
                        .run_blocking()?;
                    break;
                }
            }
        }
        // Deleting the image is safe even while a busy loop device still holds
        // it open: its space is freed when the device detaches.
        match std::fs::remove_file(&self.image_file) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::Io {
                    path: self.image_file.clone(),
                    source,
                });
            }
        }
        // Removes the mount point only if it is an empty directory again; a
        // leftover directory is harmless.
        if let Err(error) = std::fs::remove_dir(&self.mount_point) {
            tracing::debug!(mount_point = %self.mount_point.display(), %error, "mount point kept");
        }
        Ok(())
    }
}

impl Drop for BtrfsPool {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(error) = self.teardown() {
            tracing::warn!(
                mount_point = %self.mount_point.display(),
                error = %crate::error_chain(&error),
                "cannot tear down a btrfs pool"
            );
        }
    }
}
