//! Default locations shared by ployzd and ployzctl, so both agree without
//! configuration: system paths for root, per-user paths otherwise.

use std::path::PathBuf;

/// The daemon's gRPC socket: `/run/ployz/ployzd.sock` for root, otherwise
/// `$XDG_RUNTIME_DIR/ployz/ployzd.sock`, falling back to `/tmp/ployz-<uid>/ployzd.sock`.
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/ployz/ployzd.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("ployz/ployzd.sock"),
        _ => PathBuf::from(format!("/tmp/ployz-{}/ployzd.sock", uid())),
    }
}

/// The daemon's data directory: `/var/lib/ployz` for root, otherwise
/// `$XDG_DATA_HOME/ployz` or `~/.local/share/ployz`.
pub fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/ployz");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ployz");
    }
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".local/share/ployz"),
        _ => PathBuf::from(format!("/tmp/ployz-{}/data", uid())),
    }
}

/// The daemon's pidfile lives beside its socket: `<socket>.pid`.
pub fn pidfile_for_socket(socket: &std::path::Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn is_root() -> bool {
    uid() == 0
}
