//! ZFS volumes through the `zfs` CLI: every volume is a dataset
//! `<parent>/<namespace>/<name>`, every snapshot `@<snapshot>` of it. Works
//! with kernel ZFS and with `zfs-fuse` (which cannot rename a mounted dataset,
//! so renames go through `mountpoint=none`). Depends on nothing outside
//! `storage`.
//!
//! ZFS history is linear: a dataset cannot be rolled back past a snapshot and
//! keep the snapshots taken after it, which the contract requires. So a
//! rollback to an older snapshot clones it into a new dataset, promotes the
//! clone (it takes over the snapshots up to that one) and swaps names: the
//! clone becomes `<name>`, the old dataset becomes a retired generation
//! `<name>.r<id>` that keeps the later snapshots. A volume is thus a family of
//! datasets — `<name>` plus its generations — and its snapshots are the
//! family's. Names with a `.` never collide with volume or snapshot names.
//!
//! ZFS also cannot destroy a snapshot that a clone depends on. Such a
//! snapshot is renamed out of the way and destroyed with `zfs destroy -d`
//! (deferred until the clone goes). Destroying a volume that other volumes
//! were cloned from first promotes those clones, which takes the shared
//! history off the volume, so the volume goes at once and the clones live on.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use super::{
    Capabilities, SendStream, Snapshot, SnapshotName, StorageError, Volume, VolumeBackend,
    VolumeName, mountinfo,
    process::{BrokenInput, Invocation, Output},
};

const BACKEND: &str = "zfs";

/// How many clones a volume's destroy promotes before it gives up; each
/// promotion frees the volume from at least one clone.
const MAX_ADOPTIONS: usize = 64;

/// User property holding a snapshot's creation time in Unix nanoseconds;
/// ZFS's own `creation` has one-second resolution and the snapshots of a
/// family must be ordered across datasets.
const CREATED_PROPERTY: &str = "ployz:created-unix-ns";

/// Volumes as ZFS datasets under one parent dataset (e.g. `tank/ployz`).
///
/// Operations on one volume must not run concurrently (deploy serializes
/// them); operations on different volumes may.
#[derive(Clone, Debug)]
pub struct ZfsVolumes {
    parent: String,
}

/// What an internal dataset next to a volume's own is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Generation {
    /// `<name>`: the live volume.
    Live,
    /// `<name>.r<id>`: an older generation keeping snapshots taken after the
    /// one a rollback went back to.
    Retired,
    /// `<name>.n<id>`: the next generation while a rollback swaps it in.
    Next,
}

impl Generation {
    fn suffix(self) -> &'static str {
        match self {
            Self::Live => "",
            Self::Retired => ".r",
            Self::Next => ".n",
        }
    }

    /// Splits a dataset's last component into the volume name and generation.
    fn parse(leaf: &str) -> Option<(&str, Self)> {
        let Some((name, rest)) = leaf.split_once('.') else {
            return Some((leaf, Self::Live));
        };
        let generation = match rest.as_bytes().first()? {
            b'r' => Self::Retired,
            b'n' => Self::Next,
            _ => return None,
        };
        Some((name, generation))
    }
}

#[derive(Clone, Debug)]
struct Dataset {
    name: String,
    generation: Generation,
    /// `dataset@snapshot` this dataset was cloned from.
    origin: Option<String>,
}

#[derive(Clone, Debug)]
struct ZfsSnapshot {
    dataset: String,
    /// The physical name after `@`; internal names contain a `.`.
    name: String,
    created_unix_ns: u128,
    deferred: bool,
}

impl ZfsSnapshot {
    fn full_name(&self) -> String {
        format!("{}@{}", self.dataset, self.name)
    }

    /// The contract's name, for snapshots the volume still shows.
    fn visible_name(&self) -> Option<SnapshotName> {
        if self.deferred {
            return None;
        }
        SnapshotName::new(&self.name).ok()
    }
}

/// A volume's datasets and their snapshots, oldest first.
#[derive(Debug)]
struct Family {
    volume: VolumeName,
    live: String,
    datasets: Vec<Dataset>,
    snapshots: Vec<ZfsSnapshot>,
}

impl Family {
    fn live_exists(&self) -> bool {
        self.datasets
            .iter()
            .any(|dataset| dataset.generation == Generation::Live)
    }

    fn require_live(&self) -> Result<&str, StorageError> {
        if self.live_exists() {
            Ok(&self.live)
        } else {
            Err(StorageError::NoSuchVolume {
                volume: self.volume.to_string(),
            })
        }
    }

    fn find(&self, snapshot: &SnapshotName) -> Option<&ZfsSnapshot> {
        self.snapshots
            .iter()
            .find(|candidate| candidate.visible_name().as_ref() == Some(snapshot))
    }

    /// The snapshot, or the contract's error for a missing volume or snapshot.
    fn require(&self, snapshot: &SnapshotName) -> Result<&ZfsSnapshot, StorageError> {
        self.require_live()?;
        self.find(snapshot)
            .ok_or_else(|| StorageError::NoSuchSnapshot {
                volume: self.volume.to_string(),
                snapshot: snapshot.to_string(),
            })
    }

    fn visible(&self) -> impl Iterator<Item = (&ZfsSnapshot, SnapshotName)> {
        self.snapshots
            .iter()
            .filter_map(|snapshot| snapshot.visible_name().map(|name| (snapshot, name)))
    }

    fn snapshot(&self, snapshot: &ZfsSnapshot, name: SnapshotName) -> Snapshot {
        Snapshot {
            volume: self.volume.clone(),
            name,
            created_at_unix_ms: u64::try_from(snapshot.created_unix_ns / 1_000_000)
                .unwrap_or(u64::MAX),
        }
    }
}

fn zfs() -> Invocation {
    Invocation::new("zfs")
}

fn now_unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos()
}

fn unique_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Whether a failed command's stderr says `needle`.
fn says(error: &StorageError, needle: &str) -> bool {
    matches!(error, StorageError::Command { stderr, .. } if stderr.contains(needle))
}

/// How long a dataset that is busy gets to become free. zfs-fuse reports a
/// just-mounted or just-read dataset busy for ~100 ms; a container that just
/// stopped may hold a mount briefly too.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a mutating `zfs` command, retrying while the dataset is busy.
async fn patiently(invocation: Invocation) -> Result<Output, StorageError> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(25);
    loop {
        let result = invocation.run().await;
        if let Err(error) = &result
            && says(error, "busy")
            && Instant::now() < deadline
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            continue;
        }
        return result;
    }
}

fn is_missing(error: &StorageError) -> bool {
    says(error, "does not exist")
}

fn has_dependent_clones(error: &StorageError) -> bool {
    says(error, "dependent clones")
}

impl ZfsVolumes {
    /// Opens the volumes under the existing filesystem dataset `parent`.
    pub async fn open(parent: &str) -> Result<Self, StorageError> {
        let pool_error = |reason: String| StorageError::Pool {
            path: parent.into(),
            reason,
        };
        match zfs().args(["list", "-H", "-o", "type", parent]).run().await {
            Ok(output) if output.stdout.trim() == "filesystem" => Ok(Self {
                parent: parent.to_owned(),
            }),
            Ok(output) => Err(pool_error(format!(
                "a {} is not a filesystem dataset",
                output.stdout.trim()
            ))),
            Err(error) if is_missing(&error) => Err(pool_error(format!(
                "the dataset does not exist; create it with `zfs create -p {parent}`"
            ))),
            Err(error) => Err(error),
        }
    }

    /// The parent dataset this backend manages.
    pub fn parent(&self) -> &str {
        &self.parent
    }

    fn namespace_dataset(&self, namespace: &str) -> String {
        format!("{}/{namespace}", self.parent)
    }

    fn dataset(&self, volume: &VolumeName, generation: Generation, id: &str) -> String {
        format!(
            "{}/{}/{}{}{id}",
            self.parent,
            volume.namespace,
            volume.name,
            generation.suffix()
        )
    }

    fn live(&self, volume: &VolumeName) -> String {
        self.dataset(volume, Generation::Live, "")
    }

    /// The filesystems directly under `<parent>/<namespace>` belonging to `volume`.
    async fn datasets(&self, volume: &VolumeName) -> Result<Vec<Dataset>, StorageError> {
        let root = self.namespace_dataset(&volume.namespace);
        let output = match zfs()
            .args([
                "list",
                "-H",
                "-t",
                "filesystem",
                "-o",
                "name,origin",
                "-r",
                "-d",
                "1",
            ])
            .arg(&root)
            .run()
            .await
        {
            Ok(output) => output,
            Err(error) if is_missing(&error) => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let prefix = format!("{root}/");
        let mut datasets = Vec::new();
        for line in output.stdout.lines() {
            let mut fields = line.split('\t');
            let (Some(name), Some(origin)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some(leaf) = name.strip_prefix(&prefix) else {
                continue;
            };
            let Some((base, generation)) = Generation::parse(leaf) else {
                continue;
            };
            if base == volume.name {
                datasets.push(Dataset {
                    name: name.to_owned(),
                    generation,
                    origin: (origin != "-").then(|| origin.to_owned()),
                });
            }
        }
        Ok(datasets)
    }

    /// Every snapshot of `datasets`, oldest first.
    async fn snapshots_of(&self, datasets: &[&str]) -> Result<Vec<ZfsSnapshot>, StorageError> {
        if datasets.is_empty() {
            return Ok(Vec::new());
        }
        let output = zfs()
            .args(["list", "-H", "-t", "snapshot", "-o"])
            .arg(format!("name,defer_destroy,{CREATED_PROPERTY}"))
            .args(["-r", "-d", "1"])
            .args(datasets)
            .run()
            .await?;
        let mut snapshots = Vec::new();
        for line in output.stdout.lines() {
            let mut fields = line.split('\t');
            let (Some(full), Some(deferred), Some(created)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Some((dataset, name)) = full.split_once('@') else {
                continue;
            };
            let created_unix_ns = match created.parse() {
                Ok(created) => created,
                // Made outside Ployz: fall back to ZFS's one-second creation time.
                Err(_) => self.creation_seconds(full).await? * 1_000_000_000,
            };
            snapshots.push(ZfsSnapshot {
                dataset: dataset.to_owned(),
                name: name.to_owned(),
                created_unix_ns,
                deferred: matches!(deferred, "on" | "yes"),
            });
        }
        // Stable: `zfs list` orders one dataset's snapshots by transaction
        // group, which breaks ties between equal times.
        snapshots.sort_by_key(|snapshot| snapshot.created_unix_ns);
        Ok(snapshots)
    }

    async fn creation_seconds(&self, full_name: &str) -> Result<u128, StorageError> {
        let output = zfs()
            .args(["get", "-H", "-p", "-o", "value", "creation", full_name])
            .run()
            .await?;
        output
            .stdout
            .trim()
            .parse()
            .map_err(|_| StorageError::Command {
                command: format!("zfs get -H -p -o value creation {full_name}"),
                stderr: format!("unexpected creation time `{}`", output.stdout.trim()),
            })
    }

    async fn family(&self, volume: &VolumeName) -> Result<Family, StorageError> {
        let datasets = self.datasets(volume).await?;
        let names: Vec<&str> = datasets
            .iter()
            .map(|dataset| dataset.name.as_str())
            .collect();
        let snapshots = self.snapshots_of(&names).await?;
        Ok(Family {
            volume: volume.clone(),
            live: self.live(volume),
            datasets,
            snapshots,
        })
    }

    async fn volume(&self, volume: &VolumeName) -> Result<Option<Volume>, StorageError> {
        let output = match zfs()
            .args(["list", "-H", "-o", "mountpoint"])
            .arg(self.live(volume))
            .run()
            .await
        {
            Ok(output) => output,
            Err(error) if is_missing(&error) => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(Some(Volume {
            name: volume.clone(),
            path: output.stdout.trim().into(),
        }))
    }

    async fn require_volume(&self, volume: &VolumeName) -> Result<Volume, StorageError> {
        self.volume(volume)
            .await?
            .ok_or_else(|| StorageError::NoSuchVolume {
                volume: volume.to_string(),
            })
    }

    /// The volume after checking that its path really is its dataset's mount:
    /// a path whose dataset failed to mount would take writes on the parent
    /// filesystem without a word.
    async fn mounted_volume(&self, volume: &VolumeName) -> Result<Volume, StorageError> {
        let found = self.require_volume(volume).await?;
        let dataset = self.live(volume);
        let deadline = Instant::now() + BUSY_TIMEOUT;
        while !mountinfo::is_mount_point(&found.path) {
            let mounted = zfs()
                .args(["get", "-H", "-o", "value", "mounted", &dataset])
                .run()
                .await?;
            if mounted.stdout.trim() == "no" {
                patiently(zfs().args(["mount", &dataset])).await?;
            }
            if Instant::now() > deadline {
                return Err(StorageError::Pool {
                    path: found.path,
                    reason: format!("dataset `{dataset}` is not mounted there"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(found)
    }

    /// Renames a dataset. zfs-fuse cannot rename a mounted dataset, so the
    /// dataset is unmounted (`mountpoint=none`) first and, when `mount` says
    /// so, mounted again at its inherited path under the new name.
    async fn rename(&self, from: &str, to: &str, mount: Mount) -> Result<(), StorageError> {
        patiently(zfs().args(["set", "mountpoint=none", from])).await?;
        patiently(zfs().args(["rename", from, to])).await?;
        if mount == Mount::Inherited {
            patiently(zfs().args(["inherit", "mountpoint", to])).await?;
        }
        Ok(())
    }

    /// Destroys one snapshot now, or — when a clone depends on it — renames it
    /// out of the contract's view and defers its destruction to the clone's.
    async fn destroy_physical_snapshot(&self, snapshot: &ZfsSnapshot) -> Result<(), StorageError> {
        let full = snapshot.full_name();
        match patiently(zfs().args(["destroy", &full])).await {
            Ok(_) => Ok(()),
            Err(error) if has_dependent_clones(&error) => {
                let hidden = if snapshot.visible_name().is_some() {
                    self.hide(snapshot).await?
                } else {
                    full
                };
                patiently(zfs().args(["destroy", "-d", &hidden]))
                    .await
                    .map(drop)
            }
            Err(error) => Err(error),
        }
    }

    /// Renames a snapshot out of the contract's view; returns its new full name.
    async fn hide(&self, snapshot: &ZfsSnapshot) -> Result<String, StorageError> {
        let hidden = format!(
            "{}@{}.destroyed-{}",
            snapshot.dataset,
            snapshot.name,
            unique_id()
        );
        patiently(zfs().args(["rename", &snapshot.full_name(), &hidden])).await?;
        Ok(hidden)
    }

    /// Destroys `datasets` (and their snapshots) in whatever order their
    /// clone relations allow; returns those that clones elsewhere still need.
    async fn destroy_until_stuck(
        &self,
        mut datasets: Vec<String>,
    ) -> Result<Vec<String>, StorageError> {
        loop {
            let before = datasets.len();
            let mut stuck = Vec::new();
            for dataset in datasets {
                match patiently(zfs().args(["destroy", "-r", &dataset])).await {
                    Ok(_) => {}
                    Err(error) if is_missing(&error) => {}
                    Err(error) if has_dependent_clones(&error) => stuck.push(dataset),
                    Err(error) => return Err(error),
                }
            }
            if stuck.is_empty() || stuck.len() == before {
                return Ok(stuck);
            }
            datasets = stuck;
        }
    }

    /// Promotes the clone of `dataset` made from its latest snapshot. That
    /// moves the snapshot and the ones before it — renamed out of the way
    /// first, so they cannot collide with the clone's own — to the clone,
    /// which no longer depends on `dataset`. Returns the clone.
    async fn hand_history_to_a_clone(&self, dataset: &str) -> Result<String, StorageError> {
        let snapshots = self.snapshots_of(&[dataset]).await?;
        // Clones may live anywhere in the pool.
        let pool = self.parent.split('/').next().unwrap_or(&self.parent);
        let output = zfs()
            .args([
                "list",
                "-H",
                "-t",
                "filesystem",
                "-o",
                "name,origin",
                "-r",
                pool,
            ])
            .run()
            .await?;
        let adopter = output
            .stdout
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter_map(|(clone, origin)| {
                let (origin_dataset, origin_snapshot) = origin.split_once('@')?;
                let position = snapshots
                    .iter()
                    .position(|snapshot| snapshot.name == origin_snapshot)?;
                (origin_dataset == dataset).then_some((position, clone))
            })
            .max_by_key(|(position, _)| *position)
            .map(|(_, clone)| clone.to_owned())
            .ok_or_else(|| StorageError::Command {
                command: format!("zfs destroy -r {dataset}"),
                stderr: "has dependent clones, but no clone of it was found".to_owned(),
            })?;
        for snapshot in &snapshots {
            if snapshot.visible_name().is_some() {
                self.hide(snapshot).await?;
            }
        }
        patiently(zfs().args(["promote", &adopter])).await?;
        Ok(adopter)
    }

    /// Destroys `dataset` if it is an internal generation that no longer shows
    /// any snapshot, then does the same for what it was cloned from. Datasets
    /// that clones still need are left for a later pass.
    async fn collect(&self, mut dataset: Option<String>) {
        while let Some(name) = dataset.take() {
            let leaf = name.rsplit('/').next().unwrap_or_default();
            match Generation::parse(leaf) {
                Some((_, Generation::Retired)) => {}
                Some((_, Generation::Live | Generation::Next)) | None => return,
            }
            if !name.starts_with(&format!("{}/", self.parent)) {
                return;
            }
            let origin = match zfs()
                .args(["list", "-H", "-o", "origin", &name])
                .run()
                .await
            {
                Ok(output) => Some(output.stdout.trim().to_owned()).filter(|origin| origin != "-"),
                Err(_) => return,
            };
            let snapshots = match self.snapshots_of(&[&name]).await {
                Ok(snapshots) => snapshots,
                Err(_) => return,
            };
            if snapshots
                .iter()
                .any(|snapshot| snapshot.visible_name().is_some())
            {
                return;
            }
            match patiently(zfs().args(["destroy", "-r", &name])).await {
                Ok(_) => {}
                Err(error) if has_dependent_clones(&error) => return,
                Err(error) => {
                    tracing::warn!(dataset = %name, error = %crate::error_chain(&error), "cannot collect a dataset");
                    return;
                }
            }
            dataset = origin.and_then(|origin| {
                origin
                    .split_once('@')
                    .map(|(dataset, _)| dataset.to_owned())
            });
        }
    }

    /// Rolls back by cloning `source` into a new generation that takes over
    /// the older snapshots (`zfs promote`) and swapping it in as `<name>`; the
    /// old dataset becomes a retired generation with the later snapshots.
    async fn swap_in_clone(
        &self,
        family: &Family,
        source: &ZfsSnapshot,
    ) -> Result<(), StorageError> {
        let id = unique_id();
        let next = self.dataset(&family.volume, Generation::Next, &id);
        let retired = self.dataset(&family.volume, Generation::Retired, &id);
        let live = family.live.as_str();
        patiently(zfs().args(["clone", "-o", "mountpoint=none", &source.full_name(), &next]))
            .await?;
        patiently(zfs().args(["promote", &next])).await?;
        // Before this point the live dataset is untouched; `next` holds some
        // of the snapshots now but is part of the family, so none is lost.
        if let Err(error) = self.rename(live, &retired, Mount::None).await {
            restore_mount(live).await;
            return Err(error);
        }
        if let Err(error) = self.rename(&next, live, Mount::Inherited).await {
            // Put the old content back under the volume's name.
            if let Err(undo) = self.rename(&retired, live, Mount::Inherited).await {
                tracing::error!(
                    volume = %family.volume,
                    retired = %retired,
                    next = %next,
                    error = %crate::error_chain(&undo),
                    "rollback left the volume without its dataset"
                );
            }
            return Err(error);
        }
        // The retired generation's unsnapshotted content is discarded by the
        // rollback; drop it now rather than keep its space.
        let kept = self.snapshots_of(&[&retired]).await?;
        if kept
            .iter()
            .all(|snapshot| snapshot.visible_name().is_none())
        {
            self.collect(Some(retired)).await;
        } else if let Some(latest) = kept.last() {
            let latest = latest.full_name();
            if let Err(error) = patiently(zfs().args(["rollback", &latest])).await {
                tracing::warn!(dataset = %retired, error = %crate::error_chain(&error), "cannot trim a retired generation");
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mount {
    None,
    Inherited,
}

/// Best effort after a failed rename: mount the dataset again where it was.
async fn restore_mount(dataset: &str) {
    if let Err(error) = patiently(zfs().args(["inherit", "mountpoint", dataset])).await {
        tracing::error!(dataset, error = %crate::error_chain(&error), "cannot remount a volume");
    }
}

impl VolumeBackend for ZfsVolumes {
    fn kind(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshots: true,
            clones: true,
            send_receive: true,
        }
    }

    async fn create(&self, volume: &VolumeName) -> Result<Volume, StorageError> {
        let already_exists = || StorageError::AlreadyExists {
            volume: volume.to_string(),
        };
        if self.volume(volume).await?.is_some() {
            return Err(already_exists());
        }
        match patiently(zfs().args(["create", "-p"]).arg(self.live(volume))).await {
            Ok(_) => {}
            // Created but not mounted: mounted_volume mounts it.
            Err(error) if says(&error, "successfully created") => {}
            // Lost a race with another create of the same volume.
            Err(_) if self.volume(volume).await?.is_some() => return Err(already_exists()),
            Err(error) => return Err(error),
        }
        self.mounted_volume(volume).await
    }

    async fn get(&self, volume: &VolumeName) -> Result<Option<Volume>, StorageError> {
        self.volume(volume).await
    }

    async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        let output = zfs()
            .args([
                "list",
                "-H",
                "-t",
                "filesystem",
                "-o",
                "name,mountpoint",
                "-r",
                "-d",
                "2",
            ])
            .arg(&self.parent)
            .run()
            .await?;
        let prefix = format!("{}/", self.parent);
        let mut volumes = Vec::new();
        for line in output.stdout.lines() {
            let mut fields = line.split('\t');
            let (Some(name), Some(mountpoint)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some((namespace, leaf)) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            if let Ok(volume) = VolumeName::new(namespace, leaf) {
                volumes.push(Volume {
                    name: volume,
                    path: mountpoint.into(),
                });
            }
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    async fn destroy(&self, volume: &VolumeName) -> Result<(), StorageError> {
        let family = self.family(volume).await?;
        let mut remaining: Vec<String> = family
            .datasets
            .iter()
            .map(|dataset| dataset.name.clone())
            .collect();
        // What the family was cloned from outside itself may be waiting for it.
        let outside_origins: Vec<String> = family
            .datasets
            .iter()
            .filter_map(|dataset| dataset.origin.as_deref())
            .filter_map(|origin| origin.split_once('@').map(|(dataset, _)| dataset))
            .filter(|origin| !remaining.iter().any(|name| name == origin))
            .map(str::to_owned)
            .collect();
        let mut adopters = Vec::new();
        for _ in 0..MAX_ADOPTIONS {
            remaining = self.destroy_until_stuck(remaining).await?;
            let Some(stuck) = remaining.first() else {
                break;
            };
            adopters.push(self.hand_history_to_a_clone(stuck).await?);
        }
        if let Some(stuck) = remaining.first() {
            return Err(StorageError::Command {
                command: format!("zfs destroy -r {stuck}"),
                stderr: format!("still has dependent clones after {MAX_ADOPTIONS} promotions"),
            });
        }
        // The adopters hold the volume's old history under hidden names.
        for adopter in adopters {
            for snapshot in self.snapshots_of(&[&adopter]).await? {
                if snapshot.visible_name().is_none() && !snapshot.deferred {
                    self.destroy_physical_snapshot(&snapshot).await?;
                }
            }
        }
        for origin in outside_origins {
            self.collect(Some(origin)).await;
        }
        Ok(())
    }

    async fn snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<Snapshot, StorageError> {
        let family = self.family(volume).await?;
        let live = family.require_live()?;
        if family.find(snapshot).is_some() {
            return Err(StorageError::SnapshotExists {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        let created_unix_ns = now_unix_ns();
        patiently(
            zfs()
                .args(["snapshot", "-o"])
                .arg(format!("{CREATED_PROPERTY}={created_unix_ns}"))
                .arg(format!("{live}@{snapshot}")),
        )
        .await?;
        let physical = ZfsSnapshot {
            dataset: live.to_owned(),
            name: snapshot.to_string(),
            created_unix_ns,
            deferred: false,
        };
        Ok(family.snapshot(&physical, snapshot.clone()))
    }

    async fn snapshots(&self, volume: &VolumeName) -> Result<Vec<Snapshot>, StorageError> {
        let family = self.family(volume).await?;
        family.require_live()?;
        Ok(family
            .visible()
            .map(|(snapshot, name)| family.snapshot(snapshot, name))
            .collect())
    }

    async fn destroy_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        let family = self.family(volume).await?;
        let Some(physical) = family.find(snapshot) else {
            return Ok(());
        };
        self.destroy_physical_snapshot(physical).await?;
        if physical.dataset != family.live {
            self.collect(Some(physical.dataset.clone())).await;
        }
        Ok(())
    }

    async fn clone_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        target: &VolumeName,
    ) -> Result<Volume, StorageError> {
        let family = self.family(volume).await?;
        let source = family.require(snapshot)?;
        if self.volume(target).await?.is_some() {
            return Err(StorageError::AlreadyExists {
                volume: target.to_string(),
            });
        }
        patiently(
            zfs()
                .args(["clone", "-p", &source.full_name()])
                .arg(self.live(target)),
        )
        .await?;
        self.mounted_volume(target).await
    }

    async fn rollback(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<(), StorageError> {
        let family = self.family(volume).await?;
        let source = family.require(snapshot)?;
        let latest_on_live = family
            .snapshots
            .iter()
            .filter(|candidate| candidate.dataset == family.live)
            .max_by_key(|candidate| candidate.created_unix_ns);
        let is_latest =
            latest_on_live.is_some_and(|latest| latest.full_name() == source.full_name());
        if is_latest {
            // Nothing was taken after it on this dataset: a plain rollback keeps every snapshot.
            patiently(zfs().args(["rollback", &source.full_name()])).await?;
        } else {
            self.swap_in_clone(&family, source).await?;
        }
        self.mounted_volume(volume).await.map(drop)
    }

    async fn send(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        base: Option<&SnapshotName>,
    ) -> Result<SendStream, StorageError> {
        let family = self.family(volume).await?;
        let source = family.require(snapshot)?;
        let mut send = zfs().arg("send");
        if let Some(base) = base {
            let base = family.require(base)?;
            if base.dataset != source.dataset {
                // `zfs send -i` needs both in one dataset (or makes a clone
                // stream a receiver cannot apply to an existing volume).
                return Err(StorageError::Unsupported {
                    backend: BACKEND,
                    operation: "send an incremental stream between snapshots on either side of a rollback to an \
                                older snapshot (send it in full)",
                });
            }
            send = send.arg("-i").arg(base.full_name());
        }
        send.arg(source.full_name()).spawn_stream()
    }

    /// A full stream needs an absent volume; an incremental one applies to a
    /// volume whose latest snapshot is the stream's base, discarding live
    /// changes made since (`zfs receive -F`).
    async fn receive(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
        stream: SendStream,
    ) -> Result<Snapshot, StorageError> {
        let family = self.family(volume).await?;
        if family.find(snapshot).is_some() {
            return Err(StorageError::SnapshotExists {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        let live = family.live.clone();
        let mut receive = zfs().arg("receive");
        if family.live_exists() {
            receive = receive.arg("-F");
        } else {
            patiently(
                zfs()
                    .args(["create", "-p"])
                    .arg(self.namespace_dataset(&volume.namespace)),
            )
            .await?;
        }
        let target = format!("{live}@{snapshot}");
        receive
            .arg(&target)
            .feed(stream, Path::new(&target), BrokenInput::EndInput)
            .await?;
        let created_unix_ns = now_unix_ns();
        patiently(
            zfs()
                .arg("set")
                .arg(format!("{CREATED_PROPERTY}={created_unix_ns}"))
                .arg(&target),
        )
        .await?;
        self.mounted_volume(volume).await?;
        let physical = ZfsSnapshot {
            dataset: live,
            name: snapshot.to_string(),
            created_unix_ns,
            deferred: false,
        };
        Ok(family.snapshot(&physical, snapshot.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_leaves_parse_into_volume_and_generation() {
        assert_eq!(Generation::parse("db"), Some(("db", Generation::Live)));
        assert_eq!(
            Generation::parse("db.r0192ab"),
            Some(("db", Generation::Retired))
        );
        assert_eq!(
            Generation::parse("db.n0192ab"),
            Some(("db", Generation::Next))
        );
        assert_eq!(Generation::parse("db.x1"), None);
        assert_eq!(Generation::parse("db."), None);
    }

    #[test]
    fn internal_and_deferred_snapshots_are_invisible() {
        let snapshot = |name: &str, deferred| ZfsSnapshot {
            dataset: "tank/ployz/ns/db".to_owned(),
            name: name.to_owned(),
            created_unix_ns: 0,
            deferred,
        };
        assert!(snapshot("deploy-1", false).visible_name().is_some());
        assert!(snapshot("deploy-1", true).visible_name().is_none());
        assert!(
            snapshot("deploy-1.destroyed-0192", false)
                .visible_name()
                .is_none()
        );
    }
}
