//! storage: persistent volumes on this machine through a narrow contract
//! ([`VolumeBackend`]): create, snapshot, clone (writable, copy-on-write),
//! roll back to a snapshot, destroy, list, and send or receive a full or
//! incremental stream. Backends: [`btrfs::BtrfsVolumes`] (subvolumes),
//! [`zfs::ZfsVolumes`] (the `zfs` CLI) and [`dir::DirVolumes`] (plain
//! directories, no snapshots). A backend says what it can do in
//! [`Capabilities`] so an operation fails its precondition check before it
//! mutates anything. Storage executes; deciding when to snapshot is deploy's.

pub mod btrfs;
pub mod dir;
mod mountinfo;
mod process;
pub mod zfs;

use std::{fmt, future::Future, path::PathBuf, pin::Pin};

use tokio::io::AsyncRead;

/// A volume's identity: the namespace that owns it and its name there.
/// Both are DNS-label-like: 1–63 of `[a-z0-9-]`, starting with a letter.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct VolumeName {
    pub namespace: String,
    pub name: String,
}

impl VolumeName {
    pub fn new(namespace: &str, name: &str) -> Result<Self, StorageError> {
        for part in [namespace, name] {
            if !is_label(part) {
                return Err(StorageError::InvalidName {
                    name: format!("{namespace}/{name}"),
                });
            }
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A snapshot's name within its volume: 1–64 of `[A-Za-z0-9_-]`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SnapshotName(String);

impl SnapshotName {
    pub fn new(name: &str) -> Result<Self, StorageError> {
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(StorageError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names of the subdirectories of `dir` (subvolumes are directories), sorted;
/// an absent `dir` has none.
pub(crate) async fn subdirectories(dir: &std::path::Path) -> Result<Vec<String>, StorageError> {
    let io_error = |source| StorageError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut read_dir = match tokio::fs::read_dir(dir).await {
        Ok(read_dir) => read_dir,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(error)),
    };
    let mut names = Vec::new();
    while let Some(entry) = read_dir.next_entry().await.map_err(io_error)? {
        if entry.file_type().await.map_err(io_error)?.is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn is_label(part: &str) -> bool {
    (1..=63).contains(&part.len())
        && part.starts_with(|c: char| c.is_ascii_lowercase())
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A live volume: a directory a container can bind-mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub name: VolumeName,
    pub path: PathBuf,
}

/// A read-only point-in-time copy of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub volume: VolumeName,
    pub name: SnapshotName,
    /// Creation time as reported by the backend, Unix milliseconds (0 if unknown).
    pub created_at_unix_ms: u64,
}

/// What a backend supports; checked before an operation mutates anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub snapshots: bool,
    /// Writable copy-on-write clones of a snapshot.
    pub clones: bool,
    /// Full and incremental send / receive streams.
    pub send_receive: bool,
}

/// A send stream: the bytes of a full or incremental volume transfer.
pub type SendStream = Pin<Box<dyn AsyncRead + Send>>;

/// Persistent volumes on one machine.
pub trait VolumeBackend: Clone + Send + Sync + 'static {
    /// The backend's name in messages, e.g. `btrfs`.
    fn kind(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Creates an empty volume; [`StorageError::AlreadyExists`] if it exists.
    fn create(
        &self,
        volume: &VolumeName,
    ) -> impl Future<Output = Result<Volume, StorageError>> + Send;

    /// The volume, `None` when absent.
    fn get(
        &self,
        volume: &VolumeName,
    ) -> impl Future<Output = Result<Option<Volume>, StorageError>> + Send;

    /// Every volume, sorted by name.
    fn list(&self) -> impl Future<Output = Result<Vec<Volume>, StorageError>> + Send;

    /// Destroys a volume and its snapshots; destroying an absent volume is not an error.
    fn destroy(&self, volume: &VolumeName)
    -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Takes a read-only snapshot of the volume's current content.
    fn snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> impl Future<Output = Result<Snapshot, StorageError>> + Send;

    /// The volume's snapshots, oldest first.
    fn snapshots(
        &self,
        volume: &VolumeName,
    ) -> impl Future<Output = Result<Vec<Snapshot>, StorageError>> + Send;

    /// Destroys one snapshot; destroying an absent snapshot is not an error.
    fn destroy_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Creates `target` as a writable copy-on-write clone of `volume@snapshot`.
    fn clone_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        target: &VolumeName,
    ) -> impl Future<Output = Result<Volume, StorageError>> + Send;

    /// Replaces the volume's content with the snapshot's. Snapshots taken after
    /// `snapshot` are kept. Nothing may have the volume mounted.
    fn rollback(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// A stream of `volume@snapshot`, incremental from `base` when given.
    fn send(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        base: Option<&SnapshotName>,
    ) -> impl Future<Output = Result<SendStream, StorageError>> + Send;

    /// Receives a stream made by `send` into `volume` (created if absent, as a
    /// snapshot `snapshot` and a live volume with the same content).
    fn receive(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        stream: SendStream,
    ) -> impl Future<Output = Result<Snapshot, StorageError>> + Send;
}

/// What can go wrong with volumes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid volume or snapshot name `{name}`")]
    InvalidName { name: String },
    #[error("the {backend} backend cannot {operation}")]
    Unsupported {
        backend: &'static str,
        operation: &'static str,
    },
    #[error("volume `{volume}` already exists")]
    AlreadyExists { volume: String },
    #[error("volume `{volume}` does not exist")]
    NoSuchVolume { volume: String },
    #[error("volume `{volume}` has no snapshot `{snapshot}`")]
    NoSuchSnapshot { volume: String, snapshot: String },
    #[error("snapshot `{snapshot}` of volume `{volume}` already exists")]
    SnapshotExists { volume: String, snapshot: String },
    #[error("storage pool {}: {reason}", path.display())]
    Pool { path: PathBuf, reason: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("storage I/O on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
