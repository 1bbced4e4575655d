//! The storage contract: one suite of generic cases, run against every
//! `VolumeBackend` for each capability it claims — `BtrfsVolumes` on
//! loop-mounted btrfs pools, `ZfsVolumes` on file-backed zfs-fuse pools (the
//! test starts the zfs-fuse daemon when none is running) and `DirVolumes` on
//! plain directories. Every test provisions its own pools and tears them down
//! on drop, also when it fails. Needs root, btrfs-progs and zfs-fuse
//! (`cargo xtask setup`).

use std::{
    io,
    os::unix::fs::FileExt,
    path::Path,
    pin::Pin,
    process::{Command, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicI32, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ployzd::storage::{
    SendStream, SnapshotName, StorageError, VolumeBackend, VolumeName,
    btrfs::{BtrfsPool, BtrfsVolumes},
    dir::DirVolumes,
    zfs::ZfsVolumes,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Stamps out one `#[tokio::test]` per case for one fixture.
macro_rules! cases {
    ($fixture:ty => $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let _turn = <$fixture as super::Fixture>::take_turn().await;
                super::$case::<$fixture>().await;
            }
        )+
    };
}

/// Create, get, list, destroy: every backend.
macro_rules! volume_cases {
    ($fixture:ty) => {
        cases!($fixture =>
            create_makes_an_empty_writable_volume_once,
            get_of_an_absent_volume_is_none,
            list_returns_every_volume_sorted_by_name,
            destroy_removes_the_content_and_is_idempotent,
        );
    };
}

/// Snapshots, clones and rollback: backends with `snapshots` and `clones`.
macro_rules! snapshot_cases {
    ($fixture:ty) => {
        cases!($fixture =>
            snapshot_captures_the_bytes_of_that_moment,
            snapshots_are_listed_oldest_first,
            destroy_snapshot_is_idempotent_and_frees_the_name,
            clone_is_writable_and_independent,
            clone_outlives_its_origin,
            rollback_restores_the_exact_bytes_and_keeps_later_snapshots,
            rollback_to_a_missing_snapshot_changes_nothing,
            destroy_removes_the_volumes_snapshots,
        );
    };
}

/// Full and incremental streams: backends with `send_receive`.
macro_rules! send_receive_cases {
    ($fixture:ty) => {
        cases!($fixture =>
            full_send_reproduces_the_bytes_in_another_pool,
            incremental_send_carries_only_the_delta,
            a_broken_stream_receives_nothing,
            dropping_a_send_stream_midway_leaves_the_volume_usable,
        );
    };
}

mod btrfs {
    use super::*;

    volume_cases!(BtrfsFixture);
    snapshot_cases!(BtrfsFixture);
    send_receive_cases!(BtrfsFixture);
    cases!(BtrfsFixture => rollback_to_an_older_snapshot_while_a_clone_exists);

    #[test]
    fn open_refuses_a_directory_outside_btrfs() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let error = BtrfsVolumes::open(dir.path()).expect_err("/tmp is not btrfs here");
        assert!(
            matches!(&error, StorageError::Pool { reason, .. } if reason.contains("not on a btrfs filesystem")),
            "{error}"
        );
    }
}

mod zfs {
    use super::*;

    volume_cases!(ZfsFixture);
    snapshot_cases!(ZfsFixture);
    send_receive_cases!(ZfsFixture);

    /// zfs-fuse refuses to rename a dataset while a clone of one of its
    /// snapshots is mounted ("dataset is busy"); kernel ZFS renames it. A
    /// rollback to an older snapshot renames the live dataset, so on zfs-fuse
    /// it fails (cleanly: nothing changes) while a clone exists.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "zfs-fuse cannot rename a dataset while a clone of it is mounted; \
                kernel ZFS can: run with --ignored there"]
    async fn rollback_to_an_older_snapshot_while_a_clone_exists() {
        let _turn = ZfsFixture::take_turn().await;
        super::rollback_to_an_older_snapshot_while_a_clone_exists::<ZfsFixture>().await;
    }

    /// A rollback to an older snapshot moves the later ones to a retired
    /// dataset; `zfs send -i` cannot span two datasets, so this is refused up
    /// front, while increments within one generation still work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incremental_send_across_a_rollback_generation_is_unsupported() {
        let _turn = ZfsFixture::take_turn().await;
        let fixture = ZfsFixture::create().await;
        let volumes = fixture.volumes();
        let db = volume("app", "db");
        let path = volumes.create(&db).await.expect("create").path;
        write(&path, "a", b"one");
        volumes
            .snapshot(&db, &snap("s1"))
            .await
            .expect("snapshot s1");
        write(&path, "a", b"two");
        volumes
            .snapshot(&db, &snap("s2"))
            .await
            .expect("snapshot s2");
        volumes.rollback(&db, &snap("s1")).await.expect("rollback");
        write(&path, "a", b"three");
        volumes
            .snapshot(&db, &snap("s3"))
            .await
            .expect("snapshot s3");

        let error = volumes
            .send(&db, &snap("s3"), Some(&snap("s2")))
            .await
            .err()
            .expect("s2 and s3 are on different generations");
        assert!(
            matches!(error, StorageError::Unsupported { backend: "zfs", .. }),
            "{error}"
        );
        let stream = volumes
            .send(&db, &snap("s3"), Some(&snap("s1")))
            .await
            .expect("s1 and s3 share the live generation");
        assert!(
            !read_all(stream)
                .await
                .expect("incremental stream")
                .is_empty()
        );
    }
}

mod dir {
    use super::*;

    volume_cases!(DirFixture);
    cases!(DirFixture => snapshot_operations_fail_unsupported);
}

// ---------------------------------------------------------------- fixtures --

/// A backend on freshly provisioned storage, torn down on drop.
trait Fixture: Sized + Send + Sync {
    type Backend: VolumeBackend;

    async fn create() -> Self;

    fn volumes(&self) -> &Self::Backend;

    /// Waits until this backend's cases may run; held for the whole case.
    async fn take_turn() -> Option<tokio::sync::MutexGuard<'static, ()>> {
        None
    }

    /// Anything left on the storage besides empty namespaces: subvolumes,
    /// datasets, snapshots, staging entries. Empty once every volume is destroyed.
    async fn leftovers(&self) -> Vec<String>;
}

struct BtrfsFixture {
    volumes: BtrfsVolumes,
    /// Unmounted before `_dir` is removed (fields drop in order).
    pool: BtrfsPool,
    _dir: tempfile::TempDir,
}

/// Room for an 8 MiB file, its snapshots and clones, and btrfs's metadata.
const BTRFS_POOL_BYTES: u64 = 256 * 1024 * 1024;

impl Fixture for BtrfsFixture {
    type Backend = BtrfsVolumes;

    async fn create() -> Self {
        require_root();
        let dir = tempfile::tempdir().expect("temporary directory");
        let pool = BtrfsPool::create_loop(
            &dir.path().join("pool.img"),
            BTRFS_POOL_BYTES,
            &dir.path().join("mnt"),
        )
        .unwrap_or_else(|error| {
            panic!(
                "cannot create a btrfs loop pool: {}",
                ployzd::error_chain(&error)
            )
        });
        let volumes = BtrfsVolumes::open(pool.mount_point()).expect("open the btrfs pool");
        Self {
            volumes,
            pool,
            _dir: dir,
        }
    }

    fn volumes(&self) -> &BtrfsVolumes {
        &self.volumes
    }

    async fn leftovers(&self) -> Vec<String> {
        let output = run(
            "btrfs",
            &[
                "subvolume",
                "list",
                &self.pool.mount_point().to_string_lossy(),
            ],
        );
        let mut leftovers: Vec<String> = output.lines().map(str::to_owned).collect();
        let staging = self.pool.mount_point().join("staging");
        leftovers.extend(
            entries(&staging)
                .into_iter()
                .map(|entry| format!("staging/{entry}")),
        );
        for namespace in entries(&self.pool.mount_point().join("snapshots")) {
            let dir = self.pool.mount_point().join("snapshots").join(&namespace);
            leftovers.extend(
                entries(&dir)
                    .into_iter()
                    .map(|entry| format!("snapshots/{namespace}/{entry}")),
            );
        }
        leftovers
    }
}

struct ZfsFixture {
    volumes: ZfsVolumes,
    _pool: ZfsPool,
}

/// zfs-fuse deadlocks, or snapshots without data written just before, when
/// several cases drive it at once; kernel ZFS has no such limit, but here the
/// ZFS cases take turns.
static ZFS_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Fixture for ZfsFixture {
    type Backend = ZfsVolumes;

    async fn take_turn() -> Option<tokio::sync::MutexGuard<'static, ()>> {
        Some(ZFS_TURN.lock().await)
    }

    async fn create() -> Self {
        let pool = ZfsPool::create();
        let parent = format!("{}/ployz", pool.name);
        run("zfs", &["create", &parent]);
        let volumes = ZfsVolumes::open(&parent).await.unwrap_or_else(|error| {
            panic!("cannot open {parent}: {}", ployzd::error_chain(&error))
        });
        Self {
            volumes,
            _pool: pool,
        }
    }

    fn volumes(&self) -> &ZfsVolumes {
        &self.volumes
    }

    async fn leftovers(&self) -> Vec<String> {
        let parent = self.volumes.parent();
        let output = run(
            "zfs",
            &["list", "-H", "-t", "all", "-o", "name", "-r", parent],
        );
        output
            .lines()
            .filter(|name| {
                // The parent and the namespace datasets may stay.
                let below = name.strip_prefix(parent).unwrap_or(name);
                name.contains('@') || below.matches('/').count() > 1
            })
            .map(str::to_owned)
            .collect()
    }
}

struct DirFixture {
    volumes: DirVolumes,
    dir: tempfile::TempDir,
}

impl Fixture for DirFixture {
    type Backend = DirVolumes;

    async fn create() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let volumes = DirVolumes::open(dir.path()).expect("open the directory root");
        Self { volumes, dir }
    }

    fn volumes(&self) -> &DirVolumes {
        &self.volumes
    }

    async fn leftovers(&self) -> Vec<String> {
        let root = self.dir.path().join("volumes");
        entries(&root)
            .into_iter()
            .flat_map(|namespace| {
                entries(&root.join(&namespace))
                    .into_iter()
                    .map(move |name| format!("{namespace}/{name}"))
            })
            .collect()
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the storage contract mounts filesystems and needs root"
    );
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error} (run `cargo xtask setup`)"));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let Ok(read_dir) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = read_dir
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A file-backed zfs-fuse pool, destroyed on drop.
struct ZfsPool {
    name: String,
    /// Holds the vdev file; removed after the pool is destroyed.
    _dir: tempfile::TempDir,
}

/// zfs-fuse's minimum vdev is 64 MiB; the 8 MiB cases need some room.
const ZFS_POOL_BYTES: u64 = 256 * 1024 * 1024;

impl ZfsPool {
    fn create() -> Self {
        require_root();
        ensure_zfs_daemon();
        let dir = tempfile::tempdir().expect("temporary directory");
        // Random: a killed run leaves its pools in zfs-fuse's cache.
        let name = format!("ployztest{:08x}", rand::random::<u32>());
        let vdev = dir.path().join("vdev.img");
        std::fs::File::create_new(&vdev)
            .and_then(|file| file.set_len(ZFS_POOL_BYTES))
            .expect("create the vdev file");
        let mount_point = dir.path().join("mnt");
        run(
            "zpool",
            &[
                "create",
                "-m",
                &mount_point.to_string_lossy(),
                &name,
                &vdev.to_string_lossy(),
            ],
        );
        Self { name, _dir: dir }
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        // zfs-fuse reports a pool busy for a moment after its last unmount.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let output = Command::new("zpool")
                .args(["destroy", "-f", &self.name])
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(output) if output.status.success() => return,
                Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
                Ok(output) => {
                    eprintln!(
                        "cannot destroy zpool {}: {}",
                        self.name,
                        String::from_utf8_lossy(&output.stderr)
                    );
                    return;
                }
                Err(error) => {
                    eprintln!("cannot run zpool: {error}");
                    return;
                }
            }
        }
    }
}

/// The pid of the zfs-fuse daemon this process started, or 0.
static ZFS_DAEMON_PID: AtomicI32 = AtomicI32::new(0);
static ZFS_DAEMON_CHECKED: Mutex<bool> = Mutex::new(false);

/// Starts zfs-fuse unless one is already running; a daemon started here
/// lives until this process exits (restarting it per case would cost
/// seconds each: it takes that long to stop).
fn ensure_zfs_daemon() {
    let mut checked = ZFS_DAEMON_CHECKED
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if *checked {
        return;
    }
    if !zfs_daemon_answers() {
        let pid = start_zfs_daemon();
        ZFS_DAEMON_PID.store(pid, Ordering::SeqCst);
        // SAFETY: registers a plain `extern "C" fn` without captured state.
        let registered = unsafe { libc::atexit(stop_zfs_daemon) };
        assert_eq!(registered, 0, "cannot register the zfs-fuse shutdown");
    }
    *checked = true;
}

/// Runs at process exit (also after failed tests): stops the daemon this
/// process started, waiting for it so its mounts are gone.
extern "C" fn stop_zfs_daemon() {
    let pid = ZFS_DAEMON_PID.swap(0, Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    // SAFETY: `pid` is this process's own child and has not been reaped, so
    // it still names the daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped != 0 {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above; the daemon ignored SIGTERM, so kill and reap it.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

fn zfs_daemon_answers() -> bool {
    Command::new("zpool")
        .arg("list")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|error| {
            panic!("cannot run zpool: {error}; install zfs-fuse with `cargo xtask setup`")
        })
        .success()
}

/// Starts zfs-fuse in the foreground as this process's child; returns its pid.
#[expect(
    clippy::zombie_processes,
    reason = "the daemon outlives this call; stop_zfs_daemon reaps it by pid at exit"
)]
fn start_zfs_daemon() -> i32 {
    let mut child = Command::new("zfs-fuse")
        .arg("--no-daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("cannot start zfs-fuse: {error}; install it with `cargo xtask setup`")
        });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !zfs_daemon_answers() {
        if let Some(status) = child.try_wait().expect("poll zfs-fuse") {
            panic!("zfs-fuse exited with {status} before answering");
        }
        assert!(
            Instant::now() < deadline,
            "zfs-fuse does not answer after 20 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
    i32::try_from(child.id()).expect("pids fit in i32")
}

// ----------------------------------------------------------------- helpers --

fn volume(namespace: &str, name: &str) -> VolumeName {
    VolumeName::new(namespace, name).expect("valid volume name")
}

fn snap(name: &str) -> SnapshotName {
    SnapshotName::new(name).expect("valid snapshot name")
}

/// Writes `bytes` to `root/relative` (creating folders) and syncs it, so the
/// assertion is about the snapshot, not about page-cache timing.
fn write(root: &Path, relative: &str, bytes: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().expect("a file has a parent")).expect("create folders");
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    file.write_all_at(bytes, 0).expect("write");
    file.sync_all().expect("sync");
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A digest of a whole tree: every path, its kind, file contents and link targets.
fn tree_digest(root: &Path) -> String {
    fn walk(root: &Path, dir: &Path, hasher: &mut Sha256) {
        for name in entries(dir) {
            let path = dir.join(&name);
            let relative = path.strip_prefix(root).expect("under root");
            let metadata = std::fs::symlink_metadata(&path).expect("stat");
            hasher.update(relative.to_string_lossy().as_bytes());
            if metadata.is_symlink() {
                hasher.update(b"\0link\0");
                hasher.update(
                    std::fs::read_link(&path)
                        .expect("readlink")
                        .to_string_lossy()
                        .as_bytes(),
                );
            } else if metadata.is_dir() {
                hasher.update(b"\0dir\0");
                walk(root, &path, hasher);
            } else {
                hasher.update(b"\0file\0");
                hasher.update(Sha256::digest(std::fs::read(&path).expect("read")));
            }
        }
    }
    let mut hasher = Sha256::new();
    walk(root, root, &mut hasher);
    hex::encode(hasher.finalize())
}

async fn live_digest<B: VolumeBackend>(volumes: &B, volume: &VolumeName) -> String {
    let live = volumes
        .get(volume)
        .await
        .expect("get")
        .expect("the volume exists");
    tree_digest(&live.path)
}

/// The digest of a snapshot's content, read through a throwaway clone.
async fn snapshot_digest<B: VolumeBackend>(
    volumes: &B,
    volume: &VolumeName,
    snapshot: &SnapshotName,
) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let peek = VolumeName::new(
        &volume.namespace,
        &format!("peek-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
    )
    .expect("valid name");
    let clone = volumes
        .clone_snapshot(volume, snapshot, &peek)
        .await
        .unwrap_or_else(|error| {
            panic!("clone {volume}@{snapshot}: {}", ployzd::error_chain(&error))
        });
    let digest = tree_digest(&clone.path);
    volumes
        .destroy(&peek)
        .await
        .expect("destroy the peek clone");
    digest
}

async fn snapshot_names<B: VolumeBackend>(volumes: &B, volume: &VolumeName) -> Vec<String> {
    volumes
        .snapshots(volume)
        .await
        .expect("snapshots")
        .into_iter()
        .map(|snapshot| snapshot.name.as_str().to_owned())
        .collect()
}

async fn read_all(mut stream: SendStream) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    Ok(bytes)
}

fn stream_of(bytes: Vec<u8>) -> SendStream {
    Box::pin(io::Cursor::new(bytes))
}

fn assert_unsupported<T>(result: Result<T, StorageError>, operation: &str) {
    match result {
        Err(StorageError::Unsupported { backend: "dir", .. }) => {}
        Err(error) => panic!("{operation}: expected Unsupported, got {error:?}"),
        Ok(_) => panic!("{operation}: expected Unsupported, got success"),
    }
}

fn assert_no_such_volume<T>(result: Result<T, StorageError>, what: &str) {
    match result {
        Err(StorageError::NoSuchVolume { .. }) => {}
        Err(error) => panic!("{what}: expected NoSuchVolume, got {error:?}"),
        Ok(_) => panic!("{what}: expected NoSuchVolume, got success"),
    }
}

fn assert_no_such_snapshot<T>(result: Result<T, StorageError>, what: &str) {
    match result {
        Err(StorageError::NoSuchSnapshot { .. }) => {}
        Err(error) => panic!("{what}: expected NoSuchSnapshot, got {error:?}"),
        Ok(_) => panic!("{what}: expected NoSuchSnapshot, got success"),
    }
}

/// Asserts nothing is left on the fixture's storage.
async fn assert_clean<F: Fixture>(fixture: &F) {
    let leftovers = fixture.leftovers().await;
    assert!(leftovers.is_empty(), "left behind: {leftovers:#?}");
}

fn assert_snapshot_capable<B: VolumeBackend>(volumes: &B) {
    let capabilities = volumes.capabilities();
    assert!(
        capabilities.snapshots && capabilities.clones,
        "{} runs the snapshot cases but claims {capabilities:?}",
        volumes.kind()
    );
}

fn assert_send_receive_capable<B: VolumeBackend>(volumes: &B) {
    let capabilities = volumes.capabilities();
    assert!(
        capabilities.snapshots && capabilities.clones && capabilities.send_receive,
        "{} runs the send/receive cases but claims {capabilities:?}",
        volumes.kind()
    );
}

// ------------------------------------------------------------ volume cases --

async fn create_makes_an_empty_writable_volume_once<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    let db = volume("app", "db");

    let created = volumes.create(&db).await.expect("create");
    assert_eq!(created.name, db);
    assert!(
        created.path.is_dir(),
        "{} is a directory",
        created.path.display()
    );
    assert!(entries(&created.path).is_empty(), "a new volume is empty");
    write(&created.path, "data/file", b"hello");

    match volumes.create(&db).await {
        Err(StorageError::AlreadyExists { volume }) => assert_eq!(volume, "app/db"),
        other => panic!("second create: expected AlreadyExists, got {other:?}"),
    }
    let got = volumes
        .get(&db)
        .await
        .expect("get")
        .expect("the volume exists");
    assert_eq!(got, created);
    assert_eq!(
        std::fs::read(got.path.join("data/file")).expect("read back"),
        b"hello"
    );
}

async fn get_of_an_absent_volume_is_none<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_eq!(volumes.get(&volume("app", "db")).await.expect("get"), None);
    volumes
        .create(&volume("app", "other"))
        .await
        .expect("create");
    assert_eq!(volumes.get(&volume("app", "db")).await.expect("get"), None);
    assert_eq!(
        volumes
            .get(&volume("elsewhere", "other"))
            .await
            .expect("get"),
        None
    );
}

async fn list_returns_every_volume_sorted_by_name<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert!(volumes.list().await.expect("list").is_empty());
    for (namespace, name) in [
        ("web", "cache"),
        ("app", "logs"),
        ("app", "db"),
        ("app", "db-2"),
    ] {
        volumes
            .create(&volume(namespace, name))
            .await
            .expect("create");
    }
    let listed = volumes.list().await.expect("list");
    let names: Vec<String> = listed.iter().map(|found| found.name.to_string()).collect();
    assert_eq!(names, ["app/db", "app/db-2", "app/logs", "web/cache"]);
    for found in &listed {
        assert_eq!(
            volumes.get(&found.name).await.expect("get").as_ref(),
            Some(found)
        );
    }
}

async fn destroy_removes_the_content_and_is_idempotent<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    let db = volume("app", "db");
    let keep = volume("app", "keep");
    volumes
        .destroy(&db)
        .await
        .expect("destroying an absent volume is fine");

    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "file", b"old content");
    volumes.create(&keep).await.expect("create");
    volumes.destroy(&db).await.expect("destroy");
    assert_eq!(volumes.get(&db).await.expect("get"), None);
    let names: Vec<VolumeName> = volumes
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|found| found.name)
        .collect();
    assert_eq!(names, std::slice::from_ref(&keep));
    volumes
        .destroy(&db)
        .await
        .expect("destroying twice is fine");

    let again = volumes.create(&db).await.expect("create after destroy");
    assert!(
        entries(&again.path).is_empty(),
        "a re-created volume starts empty"
    );
    volumes.destroy(&db).await.expect("destroy");
    volumes.destroy(&keep).await.expect("destroy");
    assert_clean(&fixture).await;
}

async fn snapshot_operations_fail_unsupported<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    let capabilities = volumes.capabilities();
    assert!(
        !capabilities.snapshots && !capabilities.clones && !capabilities.send_receive,
        "{capabilities:?}"
    );
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "file", b"content");
    let before = tree_digest(&path);

    assert_unsupported(volumes.snapshot(&db, &snap("s1")).await, "snapshot");
    assert_unsupported(
        volumes
            .clone_snapshot(&db, &snap("s1"), &volume("app", "copy"))
            .await,
        "clone",
    );
    assert_unsupported(volumes.rollback(&db, &snap("s1")).await, "rollback");
    assert_unsupported(volumes.send(&db, &snap("s1"), None).await, "send");
    assert_unsupported(
        volumes.send(&db, &snap("s2"), Some(&snap("s1"))).await,
        "incremental send",
    );
    assert_unsupported(
        volumes
            .receive(
                &volume("app", "copy"),
                &snap("s1"),
                stream_of(b"stream".to_vec()),
            )
            .await,
        "receive",
    );

    assert!(volumes.snapshots(&db).await.expect("snapshots").is_empty());
    volumes
        .destroy_snapshot(&db, &snap("s1"))
        .await
        .expect("an absent snapshot");
    assert_eq!(tree_digest(&path), before, "nothing changed");
    assert_eq!(
        volumes.get(&volume("app", "copy")).await.expect("get"),
        None
    );
}

// ---------------------------------------------------------- snapshot cases --

async fn snapshot_captures_the_bytes_of_that_moment<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "a.txt", b"first");
    write(&path, "dir/b.bin", &random_bytes(64 * 1024));
    let at_snapshot = tree_digest(&path);

    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let taken = volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");
    assert_eq!((&taken.volume, taken.name.as_str()), (&db, "s1"));
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let created = u128::from(taken.created_at_unix_ms);
    assert!(
        before.saturating_sub(2000) <= created && created <= after + 2000,
        "created_at {created} not within [{before}, {after}]"
    );

    write(&path, "a.txt", b"second");
    write(&path, "c.txt", b"new");
    std::fs::remove_file(path.join("dir/b.bin")).expect("remove");
    assert_ne!(tree_digest(&path), at_snapshot);
    assert_eq!(
        snapshot_digest(volumes, &db, &snap("s1")).await,
        at_snapshot
    );
    assert_eq!(volumes.snapshots(&db).await.expect("snapshots"), [taken]);

    match volumes.snapshot(&db, &snap("s1")).await {
        Err(StorageError::SnapshotExists { volume, snapshot }) => {
            assert_eq!((volume.as_str(), snapshot.as_str()), ("app/db", "s1"))
        }
        other => panic!("expected SnapshotExists, got {other:?}"),
    }
    let absent = volume("app", "absent");
    assert_no_such_volume(
        volumes.snapshot(&absent, &snap("s1")).await,
        "snapshot of an absent volume",
    );
    assert_no_such_volume(
        volumes.snapshots(&absent).await,
        "snapshots of an absent volume",
    );
}

async fn snapshots_are_listed_oldest_first<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    for (index, name) in ["zeta", "alpha", "mid", "Beta_2"].into_iter().enumerate() {
        write(&path, "n", index.to_string().as_bytes());
        volumes.snapshot(&db, &snap(name)).await.expect("snapshot");
    }
    let listed = volumes.snapshots(&db).await.expect("snapshots");
    let names: Vec<&str> = listed
        .iter()
        .map(|snapshot| snapshot.name.as_str())
        .collect();
    assert_eq!(names, ["zeta", "alpha", "mid", "Beta_2"]);
    assert!(listed.iter().all(|snapshot| snapshot.volume == db));
    assert!(
        listed
            .windows(2)
            .all(|pair| pair[0].created_at_unix_ms <= pair[1].created_at_unix_ms),
        "{listed:?}"
    );
}

async fn destroy_snapshot_is_idempotent_and_frees_the_name<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "f", b"one");
    volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");
    volumes.snapshot(&db, &snap("s2")).await.expect("snapshot");

    volumes
        .destroy_snapshot(&db, &snap("s1"))
        .await
        .expect("destroy s1");
    assert_eq!(snapshot_names(volumes, &db).await, ["s2"]);
    volumes
        .destroy_snapshot(&db, &snap("s1"))
        .await
        .expect("destroying twice is fine");
    volumes
        .destroy_snapshot(&volume("app", "absent"), &snap("s1"))
        .await
        .expect("an absent volume has no snapshot to destroy");
    assert_no_such_snapshot(
        volumes.rollback(&db, &snap("s1")).await,
        "rollback to a destroyed snapshot",
    );

    write(&path, "f", b"two");
    volumes
        .snapshot(&db, &snap("s1"))
        .await
        .expect("the name is free again");
    assert_eq!(snapshot_names(volumes, &db).await, ["s2", "s1"]);
    assert_eq!(
        snapshot_digest(volumes, &db, &snap("s1")).await,
        tree_digest(&path)
    );
}

async fn clone_is_writable_and_independent<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let copy = volume("preview", "db-copy");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "f", b"origin");
    write(&path, "big", &random_bytes(256 * 1024));
    let at_snapshot = tree_digest(&path);
    volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");

    let clone = volumes
        .clone_snapshot(&db, &snap("s1"), &copy)
        .await
        .expect("clone");
    assert_eq!(clone.name, copy);
    assert_eq!(volumes.get(&copy).await.expect("get"), Some(clone.clone()));
    assert_eq!(tree_digest(&clone.path), at_snapshot);

    write(&clone.path, "f", b"changed in the clone");
    write(&clone.path, "only-in-clone", b"x");
    assert_eq!(tree_digest(&path), at_snapshot, "the origin is unchanged");
    assert_eq!(
        snapshot_digest(volumes, &db, &snap("s1")).await,
        at_snapshot,
        "the snapshot is unchanged"
    );
    let clone_content = tree_digest(&clone.path);
    write(&path, "f", b"changed in the origin");
    assert_eq!(
        tree_digest(&clone.path),
        clone_content,
        "the clone is unchanged"
    );
    assert!(
        volumes
            .snapshots(&copy)
            .await
            .expect("snapshots")
            .is_empty(),
        "a clone starts without snapshots"
    );

    match volumes.clone_snapshot(&db, &snap("s1"), &copy).await {
        Err(StorageError::AlreadyExists { volume }) => assert_eq!(volume, "preview/db-copy"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_no_such_snapshot(
        volumes
            .clone_snapshot(&db, &snap("nope"), &volume("app", "x"))
            .await,
        "clone of a missing snapshot",
    );
    assert_no_such_volume(
        volumes
            .clone_snapshot(&volume("app", "absent"), &snap("s1"), &volume("app", "x"))
            .await,
        "clone of an absent volume",
    );
    assert_eq!(volumes.get(&volume("app", "x")).await.expect("get"), None);
}

async fn clone_outlives_its_origin<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let copy = volume("preview", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "f", b"origin");
    let at_snapshot = tree_digest(&path);
    volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");
    write(&path, "f", b"later");
    volumes.snapshot(&db, &snap("s2")).await.expect("snapshot");
    let clone = volumes
        .clone_snapshot(&db, &snap("s1"), &copy)
        .await
        .expect("clone");

    volumes.destroy(&db).await.expect("destroy the origin");
    assert_eq!(volumes.get(&db).await.expect("get"), None);
    assert_eq!(
        tree_digest(&clone.path),
        at_snapshot,
        "the clone kept its content"
    );
    write(&clone.path, "g", b"still writable");
    let names: Vec<VolumeName> = volumes
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|found| found.name)
        .collect();
    assert_eq!(names, std::slice::from_ref(&copy));

    // The origin's name is free again, with no snapshots of its own.
    volumes.create(&db).await.expect("re-create the origin");
    assert!(volumes.snapshots(&db).await.expect("snapshots").is_empty());
    volumes.destroy(&db).await.expect("destroy");

    volumes.destroy(&copy).await.expect("destroy the clone");
    assert_clean(&fixture).await;
}

async fn rollback_restores_the_exact_bytes_and_keeps_later_snapshots<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;

    write(&path, "config", b"v1");
    write(&path, "data/blob", &random_bytes(128 * 1024));
    let first = tree_digest(&path);
    volumes
        .snapshot(&db, &snap("s1"))
        .await
        .expect("snapshot s1");
    write(&path, "config", b"v2");
    write(&path, "data/extra", b"added");
    let second = tree_digest(&path);
    volumes
        .snapshot(&db, &snap("s2"))
        .await
        .expect("snapshot s2");
    write(&path, "config", b"unsnapshotted");
    std::fs::remove_dir_all(path.join("data")).expect("remove");

    volumes
        .rollback(&db, &snap("s1"))
        .await
        .expect("rollback to s1");
    let live = volumes
        .get(&db)
        .await
        .expect("get")
        .expect("the volume exists");
    assert_eq!(live.path, path, "rollback keeps the volume's path");
    assert_eq!(tree_digest(&path), first, "exactly the bytes of s1");
    assert_eq!(
        snapshot_names(volumes, &db).await,
        ["s1", "s2"],
        "later snapshots are kept"
    );
    assert_eq!(
        snapshot_digest(volumes, &db, &snap("s2")).await,
        second,
        "and still hold their bytes"
    );

    write(&path, "config", b"v3");
    let third = tree_digest(&path);
    volumes
        .snapshot(&db, &snap("s3"))
        .await
        .expect("snapshot s3");
    assert_eq!(snapshot_names(volumes, &db).await, ["s1", "s2", "s3"]);

    // Forward to a snapshot taken before the last rollback, and back again.
    volumes
        .rollback(&db, &snap("s2"))
        .await
        .expect("rollback to s2");
    assert_eq!(tree_digest(&path), second);
    assert_eq!(snapshot_names(volumes, &db).await, ["s1", "s2", "s3"]);
    assert_eq!(snapshot_digest(volumes, &db, &snap("s3")).await, third);
    volumes
        .rollback(&db, &snap("s3"))
        .await
        .expect("rollback to s3");
    assert_eq!(tree_digest(&path), third);
    volumes
        .rollback(&db, &snap("s1"))
        .await
        .expect("rollback to s1 again");
    assert_eq!(tree_digest(&path), first);

    volumes
        .destroy_snapshot(&db, &snap("s2"))
        .await
        .expect("destroy s2");
    assert_eq!(snapshot_names(volumes, &db).await, ["s1", "s3"]);
    volumes
        .rollback(&db, &snap("s3"))
        .await
        .expect("rollback to s3");
    assert_eq!(tree_digest(&path), third);
    assert_eq!(snapshot_digest(volumes, &db, &snap("s1")).await, first);

    volumes.destroy(&db).await.expect("destroy");
    assert_clean(&fixture).await;
}

/// A preview clone of a deploy point must not block rolling the volume back.
async fn rollback_to_an_older_snapshot_while_a_clone_exists<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let preview = volume("preview", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "f", b"one");
    let first = tree_digest(&path);
    volumes
        .snapshot(&db, &snap("s1"))
        .await
        .expect("snapshot s1");
    write(&path, "f", b"two");
    let second = tree_digest(&path);
    volumes
        .snapshot(&db, &snap("s2"))
        .await
        .expect("snapshot s2");
    let clone = volumes
        .clone_snapshot(&db, &snap("s2"), &preview)
        .await
        .expect("clone s2");
    write(&clone.path, "f", b"preview");
    let previewed = tree_digest(&clone.path);

    volumes
        .rollback(&db, &snap("s1"))
        .await
        .unwrap_or_else(|error| panic!("rollback: {}", ployzd::error_chain(&error)));
    assert_eq!(tree_digest(&path), first);
    assert_eq!(snapshot_names(volumes, &db).await, ["s1", "s2"]);
    assert_eq!(
        tree_digest(&clone.path),
        previewed,
        "the clone is untouched"
    );
    volumes
        .rollback(&db, &snap("s2"))
        .await
        .expect("rollback to s2");
    assert_eq!(tree_digest(&path), second);

    volumes.destroy(&db).await.expect("destroy the origin");
    assert_eq!(
        tree_digest(&clone.path),
        previewed,
        "the clone outlives its origin"
    );
    volumes.destroy(&preview).await.expect("destroy the clone");
    assert_clean(&fixture).await;
}

async fn rollback_to_a_missing_snapshot_changes_nothing<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "f", b"one");
    volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");
    write(&path, "f", b"two");
    let live = tree_digest(&path);

    match volumes.rollback(&db, &snap("nope")).await {
        Err(StorageError::NoSuchSnapshot { volume, snapshot }) => {
            assert_eq!((volume.as_str(), snapshot.as_str()), ("app/db", "nope"));
        }
        other => panic!("expected NoSuchSnapshot, got {other:?}"),
    }
    assert_eq!(tree_digest(&path), live, "the live content is untouched");
    assert_eq!(snapshot_names(volumes, &db).await, ["s1"]);
    assert_no_such_volume(
        volumes
            .rollback(&volume("app", "absent"), &snap("s1"))
            .await,
        "rollback of an absent volume",
    );
}

async fn destroy_removes_the_volumes_snapshots<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_snapshot_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "f", b"one");
    volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");
    write(&path, "f", b"two");
    volumes.snapshot(&db, &snap("s2")).await.expect("snapshot");
    // A rollback to an older snapshot spreads a ZFS volume over two datasets.
    volumes.rollback(&db, &snap("s1")).await.expect("rollback");
    volumes.snapshot(&db, &snap("s3")).await.expect("snapshot");

    volumes.destroy(&db).await.expect("destroy");
    assert_eq!(volumes.get(&db).await.expect("get"), None);
    assert_clean(&fixture).await;

    volumes.create(&db).await.expect("re-create");
    assert!(
        volumes.snapshots(&db).await.expect("snapshots").is_empty(),
        "no snapshot survived"
    );
    volumes
        .snapshot(&db, &snap("s1"))
        .await
        .expect("the old names are free");
}

// ---------------------------------------------------- send / receive cases --

async fn full_send_reproduces_the_bytes_in_another_pool<F: Fixture>() {
    let source = F::create().await;
    let target = F::create().await;
    let (from, to) = (source.volumes(), target.volumes());
    assert_send_receive_capable(from);
    let db = volume("app", "db");
    let path = from.create(&db).await.expect("create").path;
    write(&path, "config", b"setting=1");
    write(&path, "data/blob", &random_bytes(1024 * 1024));
    std::fs::create_dir_all(path.join("empty")).expect("mkdir");
    std::os::unix::fs::symlink("data/blob", path.join("link")).expect("symlink");
    let sent = tree_digest(&path);
    from.snapshot(&db, &snap("s1")).await.expect("snapshot");
    write(&path, "config", b"after the snapshot");

    let stream = from.send(&db, &snap("s1"), None).await.expect("send");
    let received = to.receive(&db, &snap("s1"), stream).await.expect("receive");
    assert_eq!((&received.volume, received.name.as_str()), (&db, "s1"));
    assert_eq!(
        live_digest(to, &db).await,
        sent,
        "the live volume has the snapshot's bytes"
    );
    assert_eq!(snapshot_names(to, &db).await, ["s1"]);
    assert_eq!(snapshot_digest(to, &db, &snap("s1")).await, sent);

    // A received volume is an ordinary one: writable, and it can send on.
    let copy = to.get(&db).await.expect("get").expect("received");
    write(&copy.path, "config", b"changed on the target");
    match to.receive(&db, &snap("s1"), stream_of(Vec::new())).await {
        Err(StorageError::SnapshotExists { .. }) => {}
        other => panic!("expected SnapshotExists, got {other:?}"),
    }
    assert_no_such_snapshot(
        from.send(&db, &snap("nope"), None).await,
        "send of a missing snapshot",
    );
    assert_no_such_snapshot(
        from.send(&db, &snap("s1"), Some(&snap("nope"))).await,
        "send from a missing base",
    );
    assert_no_such_volume(
        from.send(&volume("app", "absent"), &snap("s1"), None).await,
        "send of an absent volume",
    );
}

async fn incremental_send_carries_only_the_delta<F: Fixture>() {
    let source = F::create().await;
    let target = F::create().await;
    let (from, to) = (source.volumes(), target.volumes());
    assert_send_receive_capable(from);
    let db = volume("app", "db");
    let path = from.create(&db).await.expect("create").path;
    write(&path, "big", &random_bytes(8 * 1024 * 1024));
    write(&path, "small", b"v1");
    from.snapshot(&db, &snap("s1")).await.expect("snapshot s1");
    let full = from.send(&db, &snap("s1"), None).await.expect("send s1");
    to.receive(&db, &snap("s1"), full)
        .await
        .expect("receive s1");

    // Change 4 KiB in the middle of the big file.
    let big = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join("big"))
        .expect("open");
    big.write_all_at(&random_bytes(4096), 4 * 1024 * 1024)
        .expect("write");
    big.sync_all().expect("sync");
    write(&path, "small", b"v2");
    let changed = tree_digest(&path);
    from.snapshot(&db, &snap("s2")).await.expect("snapshot s2");

    let full_size = read_all(from.send(&db, &snap("s2"), None).await.expect("full send"))
        .await
        .expect("full stream")
        .len();
    let delta = read_all(
        from.send(&db, &snap("s2"), Some(&snap("s1")))
            .await
            .expect("incremental send"),
    )
    .await
    .expect("incremental stream");
    eprintln!(
        "{}: full stream {full_size} bytes, incremental {} bytes",
        from.kind(),
        delta.len()
    );
    assert!(
        delta.len() * 20 < full_size,
        "incremental {} bytes is not much smaller than full {full_size} bytes",
        delta.len()
    );

    // Live changes on the target since s1 are replaced by s2's content.
    let copy = to.get(&db).await.expect("get").expect("received");
    write(&copy.path, "small", b"scribbled on the target");
    to.receive(&db, &snap("s2"), stream_of(delta))
        .await
        .expect("receive the increment");
    assert_eq!(live_digest(to, &db).await, changed);
    assert_eq!(snapshot_names(to, &db).await, ["s1", "s2"]);
    assert_eq!(snapshot_digest(to, &db, &snap("s2")).await, changed);
}

/// Yields `bytes`, then fails the way a broken sender does.
struct BrokenStream {
    bytes: io::Cursor<Vec<u8>>,
}

impl AsyncRead for BrokenStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.bytes).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() == before {
            return Poll::Ready(Err(io::Error::other(StorageError::Command {
                command: "test sender".to_owned(),
                stderr: "the sender broke".to_owned(),
            })));
        }
        poll
    }
}

async fn a_broken_stream_receives_nothing<F: Fixture>() {
    let source = F::create().await;
    let target = F::create().await;
    let (from, to) = (source.volumes(), target.volumes());
    assert_send_receive_capable(from);
    let db = volume("app", "db");
    let path = from.create(&db).await.expect("create").path;
    write(&path, "blob", &random_bytes(2 * 1024 * 1024));
    from.snapshot(&db, &snap("s1")).await.expect("snapshot");
    let mut bytes = read_all(from.send(&db, &snap("s1"), None).await.expect("send"))
        .await
        .expect("stream");
    bytes.truncate(bytes.len() / 2);

    let broken: SendStream = Box::pin(BrokenStream {
        bytes: io::Cursor::new(bytes),
    });
    match to.receive(&db, &snap("s1"), broken).await {
        Err(StorageError::Command { command, stderr }) => {
            assert_eq!(
                (command.as_str(), stderr.as_str()),
                ("test sender", "the sender broke")
            );
        }
        other => panic!("expected the sender's error, got {other:?}"),
    }
    assert_eq!(
        to.get(&db).await.expect("get"),
        None,
        "no volume from a broken stream"
    );
    assert_clean(&target).await;
}

async fn dropping_a_send_stream_midway_leaves_the_volume_usable<F: Fixture>() {
    let fixture = F::create().await;
    let volumes = fixture.volumes();
    assert_send_receive_capable(volumes);
    let db = volume("app", "db");
    let path = volumes.create(&db).await.expect("create").path;
    write(&path, "blob", &random_bytes(8 * 1024 * 1024));
    volumes.snapshot(&db, &snap("s1")).await.expect("snapshot");

    let mut stream = volumes.send(&db, &snap("s1"), None).await.expect("send");
    let mut first = vec![0; 64 * 1024];
    stream
        .read_exact(&mut first)
        .await
        .expect("the first bytes");
    drop(stream);

    // The killed sender must not keep the snapshot busy.
    volumes
        .destroy_snapshot(&db, &snap("s1"))
        .await
        .expect("destroy the snapshot");
    volumes
        .snapshot(&db, &snap("s1"))
        .await
        .expect("snapshot again");
    let stream = volumes
        .send(&db, &snap("s1"), None)
        .await
        .expect("send again");
    assert!(read_all(stream).await.expect("a whole stream").len() > 8 * 1024 * 1024);
    volumes.destroy(&db).await.expect("destroy");
    assert_clean(&fixture).await;
}
