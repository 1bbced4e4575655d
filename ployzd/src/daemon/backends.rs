//! Picking backends at the composition root. The volume backend is chosen by
//! configuration at run time, so [`Volumes`] wraps the three behind the one
//! [`VolumeBackend`] contract; domains below never match on which it is.

use std::path::Path;

use super::config::{StorageBackend, StorageConfig};
use crate::storage::{
    Capabilities, SendStream, Snapshot, SnapshotName, StorageError, Volume, VolumeBackend,
    VolumeName,
    btrfs::{BtrfsPool, BtrfsVolumes},
    dir::DirVolumes,
    zfs::ZfsVolumes,
};

/// This machine's volume backend, as configured.
#[derive(Clone)]
pub enum Volumes {
    Btrfs(BtrfsVolumes),
    Zfs(ZfsVolumes),
    Dir(DirVolumes),
}

impl Volumes {
    /// Opens the configured backend. For btrfs with a loop size, a pool path
    /// that is not on btrfs gets a loop-file pool under `data_dir` first (dev
    /// and tests); a pool mounted by an earlier daemon is adopted as is.
    pub async fn open(config: &StorageConfig, data_dir: &Path) -> Result<Self, StorageError> {
        match config.backend {
            StorageBackend::Dir => Ok(Volumes::Dir(DirVolumes::open(&config.path)?)),
            StorageBackend::Zfs => Ok(Volumes::Zfs(
                ZfsVolumes::open(&config.path.to_string_lossy()).await?,
            )),
            StorageBackend::Btrfs => {
                let path = config.path.clone();
                let image = data_dir.join("storage/pool.img");
                let loop_size = config.loop_size;
                let volumes =
                    tokio::task::spawn_blocking(move || open_btrfs(&path, &image, loop_size))
                        .await
                        .map_err(|error| StorageError::Pool {
                            path: config.path.clone(),
                            reason: format!("pool setup task failed: {error}"),
                        })??;
                Ok(Volumes::Btrfs(volumes))
            }
        }
    }
}

/// Opens a btrfs pool. With `loop_size`, a path that is not on btrfs gets the
/// loop-file pool at `image`: mounted again if the file exists (after a reboot),
/// created otherwise. A pool that is already mounted is adopted untouched, and
/// the mount outlives the daemon like the rest of the data plane.
fn open_btrfs(
    path: &Path,
    image: &Path,
    loop_size: Option<u64>,
) -> Result<BtrfsVolumes, StorageError> {
    let not_btrfs = match BtrfsVolumes::open(path) {
        Ok(volumes) => return Ok(volumes),
        Err(error) => error,
    };
    let Some(size) = loop_size else {
        return Err(not_btrfs);
    };
    if image.exists() {
        std::fs::create_dir_all(path).map_err(|source| StorageError::Io {
            path: path.to_owned(),
            source,
        })?;
        let output = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(path)
            .output()
            .map_err(|source| StorageError::Io {
                path: image.to_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(StorageError::Command {
                command: format!("mount -o loop {} {}", image.display(), path.display()),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
    } else {
        if let Some(parent) = image.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StorageError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        BtrfsPool::create_loop(image, size, path)?.keep_mounted();
    }
    BtrfsVolumes::open(path)
}

/// Forwards a call to whichever backend is configured.
macro_rules! each {
    ($self:ident, $backend:ident => $call:expr) => {
        match $self {
            Volumes::Btrfs($backend) => $call,
            Volumes::Zfs($backend) => $call,
            Volumes::Dir($backend) => $call,
        }
    };
}

impl VolumeBackend for Volumes {
    fn kind(&self) -> &'static str {
        each!(self, backend => backend.kind())
    }

    fn capabilities(&self) -> Capabilities {
        each!(self, backend => backend.capabilities())
    }

    async fn create(&self, volume: &VolumeName) -> Result<Volume, StorageError> {
        each!(self, backend => backend.create(volume).await)
    }

    async fn get(&self, volume: &VolumeName) -> Result<Option<Volume>, StorageError> {
        each!(self, backend => backend.get(volume).await)
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        each!(self, backend => backend.list().await)
    }

    async fn destroy(&self, volume: &VolumeName) -> Result<(), StorageError> {
        each!(self, backend => backend.destroy(volume).await)
    }

    async fn snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<Snapshot, StorageError> {
        each!(self, backend => backend.snapshot(volume, snapshot).await)
    }

    async fn snapshots(&self, volume: &VolumeName) -> Result<Vec<Snapshot>, StorageError> {
        each!(self, backend => backend.snapshots(volume).await)
    }

    async fn destroy_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        each!(self, backend => backend.destroy_snapshot(volume, snapshot).await)
    }

    async fn clone_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        target: &VolumeName,
    ) -> Result<Volume, StorageError> {
        each!(self, backend => backend.clone_snapshot(volume, snapshot, target).await)
    }

    async fn rollback(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        each!(self, backend => backend.rollback(volume, snapshot).await)
    }

    async fn send(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        base: Option<&SnapshotName>,
    ) -> Result<SendStream, StorageError> {
        each!(self, backend => backend.send(volume, snapshot, base).await)
    }

    async fn receive(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        stream: SendStream,
    ) -> Result<Snapshot, StorageError> {
        each!(self, backend => backend.receive(volume, snapshot, stream).await)
    }
}
