//! Plain-directory volumes at `<root>/volumes/<namespace>/<name>`, for
//! machines without a btrfs or ZFS pool. No snapshots, clones, rollback or
//! streams: those operations fail with [`StorageError::Unsupported`] before
//! touching anything. Depends on nothing outside `storage`.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{
    Capabilities, SendStream, Snapshot, SnapshotName, StorageError, Volume, VolumeBackend,
    VolumeName,
};

const BACKEND: &str = "dir";

/// Volumes as plain directories under one root.
#[derive(Clone, Debug)]
pub struct DirVolumes {
    root: PathBuf,
}

impl DirVolumes {
    /// Opens (creating if needed) the volume root `<root>/volumes`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StorageError> {
        let root = root.as_ref().to_owned();
        let volumes = root.join("volumes");
        std::fs::create_dir_all(&volumes).map_err(|source| StorageError::Io {
            path: volumes.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    fn volume_path(&self, volume: &VolumeName) -> PathBuf {
        self.root
            .join("volumes")
            .join(&volume.namespace)
            .join(&volume.name)
    }

    async fn require_volume(&self, volume: &VolumeName) -> Result<(), StorageError> {
        match self.get(volume).await? {
            Some(_) => Ok(()),
            None => Err(StorageError::NoSuchVolume {
                volume: volume.to_string(),
            }),
        }
    }
}

fn unsupported(operation: &'static str) -> StorageError {
    StorageError::Unsupported {
        backend: BACKEND,
        operation,
    }
}

impl VolumeBackend for DirVolumes {
    fn kind(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshots: false,
            clones: false,
            send_receive: false,
        }
    }

    async fn create(&self, volume: &VolumeName) -> Result<Volume, StorageError> {
        let path = self.volume_path(volume);
        let parent = path.parent().expect("a volume path has a parent");
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|source| StorageError::Io {
                path: parent.to_owned(),
                source,
            })?;
        match tokio::fs::create_dir(&path).await {
            Ok(()) => Ok(Volume {
                name: volume.clone(),
                path,
            }),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                Err(StorageError::AlreadyExists {
                    volume: volume.to_string(),
                })
            }
            Err(source) => Err(StorageError::Io { path, source }),
        }
    }

    async fn get(&self, volume: &VolumeName) -> Result<Option<Volume>, StorageError> {
        let path = self.volume_path(volume);
        match tokio::fs::metadata(&path).await {
            Ok(metadata) if metadata.is_dir() => Ok(Some(Volume {
                name: volume.clone(),
                path,
            })),
            Ok(_) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io { path, source }),
        }
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        let root = self.root.join("volumes");
        let mut volumes = Vec::new();
        for namespace in super::subdirectories(&root).await? {
            for name in super::subdirectories(&root.join(&namespace)).await? {
                if let Ok(volume) = VolumeName::new(&namespace, &name) {
                    let path = self.volume_path(&volume);
                    volumes.push(Volume { name: volume, path });
                }
            }
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    async fn destroy(&self, volume: &VolumeName) -> Result<(), StorageError> {
        let path = self.volume_path(volume);
        match tokio::fs::remove_dir_all(&path).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::Io { path, source }),
        }
    }

    async fn snapshot(
        &self,
        _volume: &VolumeName,
        _snapshot: &SnapshotName,
    ) -> Result<Snapshot, StorageError> {
        Err(unsupported("take snapshots"))
    }

    /// A directory volume never has snapshots.
    async fn snapshots(&self, volume: &VolumeName) -> Result<Vec<Snapshot>, StorageError> {
        self.require_volume(volume).await?;
        Ok(Vec::new())
    }

    /// Every snapshot is absent here, and destroying an absent snapshot is not an error.
    async fn destroy_snapshot(
        &self,
        _volume: &VolumeName,
        _snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        Ok(())
    }

    async fn clone_snapshot(
        &self,
        _volume: &VolumeName,
        _snapshot: &SnapshotName,
        _target: &VolumeName,
    ) -> Result<Volume, StorageError> {
        Err(unsupported("clone snapshots"))
    }

    async fn rollback(
        &self,
        _volume: &VolumeName,
        _snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        Err(unsupported("roll back to snapshots"))
    }

    async fn send(
        &self,
        _volume: &VolumeName,
        _snapshot: &SnapshotName,
        _base: Option<&SnapshotName>,
    ) -> Result<SendStream, StorageError> {
        Err(unsupported("send volume streams"))
    }

    async fn receive(
        &self,
        _volume: &VolumeName,
        _snapshot: &SnapshotName,
        _stream: SendStream,
    ) -> Result<Snapshot, StorageError> {
        Err(unsupported("receive volume streams"))
    }
}
