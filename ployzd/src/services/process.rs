//! services::process: the small Linux process facts the sidecar supervisors
//! rely on — whether a pid is alive or a zombie, its argv, session and network
//! namespace as `/proc` reports them — and signal delivery. Plain `/proc` reads
//! and libc calls; it knows nothing about any particular sidecar and must not
//! depend on tokio.

use std::{ffi::OsString, fs, io, os::unix::ffi::OsStringExt as _, path::PathBuf};

/// A process id as the standard library reports it.
pub(crate) type Pid = u32;

/// What `/proc` says about a pid right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProcState {
    /// No such process.
    Absent,
    /// Exited but not yet reaped by its parent; `kill(pid, 0)` still succeeds on it.
    Zombie,
    /// Any state in which the process still runs code (running, sleeping, stopped, ...).
    Live,
}

/// Reads the state letter from `/proc/<pid>/stat`.
pub(crate) fn state(pid: Pid) -> ProcState {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return ProcState::Absent;
    };
    // The command name (field 2) is in parentheses and may itself contain spaces
    // or parentheses, so the state letter is the first field after the last `)`.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    match state {
        Some("Z" | "X") => ProcState::Zombie,
        Some(_) => ProcState::Live,
        None => ProcState::Absent,
    }
}

/// The argument vector of a live process, or `None` when it is absent, a
/// zombie (the kernel reports an empty command line for those) or unreadable.
pub(crate) fn argv(pid: Pid) -> Option<Vec<OsString>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let mut args: Vec<OsString> = raw
        .split(|byte| *byte == 0)
        .map(|arg| OsString::from_vec(arg.to_vec()))
        .collect();
    // The command line ends with a NUL, which leaves one empty trailing piece.
    if args.last().is_some_and(|last| last.is_empty()) {
        args.pop();
    }
    Some(args)
}

/// The network namespace of `pid` (or of this process for `None`), as the
/// `net:[inode]` link target under `/proc/<pid>/ns/net`.
pub(crate) fn network_namespace(pid: Option<Pid>) -> Option<String> {
    let link = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        None => PathBuf::from("/proc/self/ns/net"),
    };
    fs::read_link(link)
        .ok()
        .map(|target| target.to_string_lossy().into_owned())
}

/// Every pid currently listed in `/proc`.
pub(crate) fn all_pids() -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<Pid>().ok())
        .collect()
}

/// Whether a signal reached its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    Delivered,
    /// The process was already gone (`ESRCH`).
    NoSuchProcess,
}

/// Sends `signal` to `pid`.
pub(crate) fn send_signal(pid: Pid, signal: libc::c_int) -> io::Result<Delivery> {
    let Ok(target) = libc::pid_t::try_from(pid) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} does not fit in pid_t"),
        ));
    };
    if target <= 0 {
        // kill(0, ..) and kill(-1, ..) address process groups, never one process.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} does not name a single process"),
        ));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the
    // target was checked above to be one positive pid, never a process group.
    let result = unsafe { libc::kill(target, signal) };
    if result == 0 {
        return Ok(Delivery::Delivered);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ESRCH) {
        Ok(Delivery::NoSuchProcess)
    } else {
        Err(error)
    }
}

/// Human name of the signals the supervisors send, for errors and logs.
pub(crate) fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_live_with_an_argv_and_a_namespace() {
        let me = std::process::id();
        assert_eq!(state(me), ProcState::Live);
        assert!(argv(me).is_some_and(|args| !args.is_empty()));
        assert_eq!(network_namespace(Some(me)), network_namespace(None));
        assert!(all_pids().contains(&me));
    }

    #[test]
    fn an_unused_pid_is_absent() {
        // pid_max is at most 2^22 on Linux, so this pid can never exist.
        let unused = 1 << 23;
        assert_eq!(state(unused), ProcState::Absent);
        assert_eq!(argv(unused), None);
        assert_eq!(
            send_signal(unused, 0).expect("kill(0) on an absent pid"),
            Delivery::NoSuchProcess
        );
    }

    #[test]
    fn process_groups_are_never_signalled() {
        assert!(send_signal(0, 0).is_err());
        assert!(send_signal(u32::MAX, 0).is_err());
    }
}
