//! `cargo xtask bench`: benchmarks that print their figures next to a reference
//! measured in the same run on the same machine, and record them in
//! docs/benchmarks.md with the command that produced them. Each benchmark is a
//! module (`overlay`, `gateway`, `dns`); this one holds what they share: child
//! processes that die with xtask, CPU placement, CPU accounting and recording.

mod dns;
mod gateway;
mod overlay;

use std::{
    fs, io,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::{cargo, step};

/// What to benchmark.
#[derive(Clone, Copy, Subcommand)]
pub(crate) enum Bench {
    /// iperf3 and ping across two namespaces: raw veth, wireguard-go, ployz-tunnel.
    Overlay,
    /// wrk through nginx as a reverse proxy and through ployz-gateway, to one nginx backend.
    Gateway,
    /// dnsperf against knot and ployz-dns serving the same 100 A records.
    Dns,
}

/// Runs the benchmark `what`; with `record`, appends its figures to docs/benchmarks.md.
pub(crate) fn run(root: &Path, what: Bench, record: bool) -> Result<()> {
    match what {
        Bench::Overlay => overlay::run(root, record),
        Bench::Gateway => gateway::run(root, record),
        Bench::Dns => dns::run(root, record),
    }
}

/// Set by SIGINT/SIGTERM so a run stops between steps and still cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Keeps xtask alive on Ctrl-C while its children die, so the guards still clean up.
fn stop_on_signals() {
    // A handler, not SIG_IGN: children would inherit SIG_IGN.
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid only reads the calling process's credentials.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command and returns its stdout, failing with its stderr.
fn output(program: &str, args: &[&str]) -> Result<String> {
    command_output(Command::new(program).args(args))
}

/// Runs `command` and returns its stdout, failing with its stderr (or stdout).
fn command_output(command: &mut Command) -> Result<String> {
    check_interrupted()?;
    let output = command
        .output()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    if !output.status.success() {
        check_interrupted()?;
        // iperf3 -J reports its errors on stdout.
        let stream = if output.stderr.is_empty() {
            &output.stdout
        } else {
            &output.stderr
        };
        bail!(
            "`{command:?}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(stream).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn has_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Installs the Debian packages of missing tools, given as `(binary, package)`.
fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(binary, _)| !has_tool(binary))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!("missing tools; run `sudo {install}`");
    }
    step(&install);
    // Installing nginx or knot may start their system services where an init
    // runs them; the benchmarks never use those, only their own processes.
    crate::run(Command::new("apt-get").arg("update"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for (binary, package) in tools {
        if !has_tool(binary) {
            bail!("`{binary}` is still missing after installing {package}");
        }
    }
    Ok(())
}

/// Builds `package` in release mode and returns the path of its binary of the same name.
fn build_release(root: &Path, package: &str) -> Result<PathBuf> {
    step(&format!("building {package} (release)"));
    crate::run(cargo(root).args(["build", "--release", "-p", package]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    Ok(target_dir.join("release").join(package))
}

/// A loopback port that is free for TCP and UDP right now.
fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no loopback port is free for both TCP and UDP")
}

/// A scratch directory for configs, logs and state, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn create(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("ployz-bench-{name}-{}", std::process::id()));
        // A leftover of an earlier run with a recycled pid is of no use.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.0.join(name);
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The CPUs a process may run on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cpus {
    Any,
    Only(Vec<usize>),
}

impl Cpus {
    /// How many CPUs this allows on a machine with `cores`.
    fn count(&self, cores: usize) -> usize {
        match self {
            Self::Any => cores,
            Self::Only(cpus) => cpus.len(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Any => "any CPU".to_owned(),
            Self::Only(cpus) => {
                let list: Vec<String> = cpus.iter().map(ToString::to_string).collect();
                format!("CPU {}", list.join(","))
            }
        }
    }
}

/// How the server under test shares the machine with the load generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// The server alone on the last CPU with one worker; the load generator
    /// (and a backend) on the others. Measures per-core efficiency.
    Pinned,
    /// Nobody pinned; the server runs one worker per CPU, as it would by default.
    Shared,
}

impl Placement {
    /// The placements a machine with `cores` CPUs can tell apart.
    fn all(cores: usize) -> Vec<Self> {
        if cores >= 2 {
            vec![Self::Pinned, Self::Shared]
        } else {
            vec![Self::Shared]
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Shared => "shared",
        }
    }

    /// The CPUs of the server under test.
    fn server_cpus(self, cores: usize) -> Cpus {
        match self {
            Self::Pinned => Cpus::Only(vec![cores - 1]),
            Self::Shared => Cpus::Any,
        }
    }

    /// The CPUs of the load generator and of anything else that is not under test.
    fn load_cpus(self, cores: usize) -> Cpus {
        match self {
            Self::Pinned => Cpus::Only((0..cores - 1).collect()),
            Self::Shared => Cpus::Any,
        }
    }

    /// Worker threads or processes of the server under test.
    fn server_workers(self, cores: usize) -> usize {
        match self {
            Self::Pinned => 1,
            Self::Shared => cores,
        }
    }
}

/// Makes `command`'s process run on `cpus` and receive SIGTERM when xtask dies,
/// so no server outlives an xtask that was killed outright.
fn place(command: &mut Command, cpus: &Cpus) {
    let cpus = match cpus {
        Cpus::Any => Vec::new(),
        Cpus::Only(cpus) => cpus.clone(),
    };
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls on memory it owns; it does not allocate.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            if !cpus.is_empty() {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for cpu in &cpus {
                    libc::CPU_SET(*cpu, &mut set);
                }
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The output of a load generator and the CPU it used.
struct Load {
    output: String,
    /// Percent of one core, from the reaped child's rusage.
    cpu_percent: f64,
}

/// Runs a load generator on `cpus` to completion.
fn run_load(command: &mut Command, cpus: &Cpus) -> Result<Load> {
    place(command, cpus);
    let started = Instant::now();
    let before = reaped_children_cpu_seconds();
    let output = command_output(command)?;
    let used = reaped_children_cpu_seconds() - before;
    let wall = started.elapsed().as_secs_f64();
    Ok(Load {
        output,
        cpu_percent: if wall > 0.0 { 100.0 * used / wall } else { 0.0 },
    })
}

/// User plus system CPU seconds of every child xtask has waited for.
fn reaped_children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Server CPU microseconds per request: comparable even when the load
/// generator, not the server, limits the rate.
fn cpu_micros_per_request(cpu_percent: f64, per_second: f64) -> f64 {
    if per_second > 0.0 {
        cpu_percent / 100.0 * 1e6 / per_second
    } else {
        0.0
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Guard(Child);

impl Guard {
    /// Starts `command` on `cpus` with its stdout and stderr in `log`.
    fn spawn(command: &mut Command, cpus: &Cpus, log: &Path) -> Result<Self> {
        let log_file =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        place(command, cpus);
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        Ok(Self(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill only sends a signal; the pid is our own unreaped
            // child, so it cannot have been recycled for another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server process started for a benchmark, with its log.
struct Server {
    name: String,
    process: Guard,
    log: PathBuf,
    port: u16,
}

impl Server {
    fn start(
        name: &str,
        command: &mut Command,
        cpus: &Cpus,
        log: PathBuf,
        port: u16,
    ) -> Result<Self> {
        let process = Guard::spawn(command, cpus, &log)?;
        Ok(Self {
            name: name.to_owned(),
            process,
            log,
            port,
        })
    }

    /// Polls `probe` until it succeeds, failing early (with the log) if the server exits.
    fn wait_ready(&mut self, probe: impl Fn(u16) -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            check_interrupted()?;
            if let Some(status) = self.process.exited() {
                bail!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            let error = match probe(self.port) {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready within 15 s: {error:#}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        // The end of a log says why a process stopped.
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|index| text.is_char_boundary(*index))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// Starts counting the CPU time of this server and its child processes.
    fn cpu_meter(&self) -> CpuMeter {
        CpuMeter::start(self.process.pid())
    }
}

/// CPU time used by a process tree over an interval, as a share of one core.
struct CpuMeter {
    pid: u32,
    started: Instant,
    cpu_seconds: f64,
}

impl CpuMeter {
    fn start(pid: u32) -> Self {
        Self {
            pid,
            started: Instant::now(),
            cpu_seconds: tree_cpu_seconds(pid),
        }
    }

    /// Percent of one core used since `start` (200 means two cores busy).
    fn percent(&self) -> f64 {
        let wall = self.started.elapsed().as_secs_f64();
        let used = tree_cpu_seconds(self.pid) - self.cpu_seconds;
        if wall > 0.0 { 100.0 * used / wall } else { 0.0 }
    }
}

/// User plus system CPU seconds of `pid` and its live descendants (nginx's
/// workers are children of its master).
fn tree_cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let mut total = 0.0;
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            total += parse_stat_cpu_ticks(&stat).unwrap_or(0) as f64 / ticks;
        }
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = fs::read_to_string(task.path().join("children")) {
                pending.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields follow the last `)`.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Other work on the machine skews every figure: waits up to a minute for
/// the machine to be quiet (under a fifth of a core busy over one second) and
/// returns the last sample, in percent of one core, to print and record.
fn background_cpu_percent() -> Result<f64> {
    const QUIET_PERCENT: f64 = 20.0;
    const ATTEMPTS: u32 = 60;
    let mut percent = 0.0;
    for attempt in 1..=ATTEMPTS {
        check_interrupted()?;
        percent = busy_percent_over_one_second()?;
        if percent <= QUIET_PERCENT {
            println!("machine is quiet: {percent:.0}% of a core busy before the run");
            return Ok(percent);
        }
        if attempt == 1 {
            println!(
                "other processes keep {percent:.0}% of a core busy; waiting up to \
                 {ATTEMPTS} s for them to finish"
            );
        }
    }
    println!("warning: still {percent:.0}% of a core busy; the figures will be skewed");
    Ok(percent)
}

/// CPU the whole machine uses over one second, in percent of one core.
fn busy_percent_over_one_second() -> Result<f64> {
    let meter = MachineMeter::start()?;
    thread::sleep(Duration::from_secs(1));
    meter.percent()
}

/// CPU the whole machine uses over an interval, in percent of one core.
struct MachineMeter {
    busy: u64,
    total: u64,
}

impl MachineMeter {
    fn start() -> Result<Self> {
        let (busy, total) = Self::sample()?;
        Ok(Self { busy, total })
    }

    fn percent(&self) -> Result<f64> {
        let (busy, total) = Self::sample()?;
        let cores = thread::available_parallelism().map_or(1, usize::from) as f64;
        let total = total.saturating_sub(self.total).max(1) as f64;
        Ok(100.0 * cores * busy.saturating_sub(self.busy) as f64 / total)
    }

    fn sample() -> Result<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let line = stat.lines().next().unwrap_or_default();
        parse_proc_stat_cpu(line).with_context(|| format!("unexpected /proc/stat line `{line}`"))
    }
}

/// Warns when a run shared the machine with other work: its figures are skewed.
/// `other` is machine CPU minus the benchmark's processes, in percent of one core.
fn warn_if_busy(other: f64) {
    if other > OTHER_CPU_WARNING_PERCENT {
        println!(
            "warning: other processes used {other:.0}% of a core during this run; \
             its figures are skewed"
        );
    }
}

/// Above this much CPU used by others during a run (percent of one core), a
/// run is flagged. The kernel's loopback work is part of "others" too, so it
/// is not zero even on a quiet machine.
const OTHER_CPU_WARNING_PERCENT: f64 = 25.0;

/// Busy and total jiffies of the aggregate `cpu` line of /proc/stat.
fn parse_proc_stat_cpu(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let values: Vec<u64> = fields
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle, total))
}

/// Where a run was measured.
struct Machine {
    date: String,
    cores: usize,
    kernel: String,
    cpu: String,
}

impl Machine {
    fn probe() -> Result<Self> {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Ok(Self {
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?
                .trim()
                .to_owned(),
            cores: thread::available_parallelism().map_or(1, usize::from),
            kernel: output("uname", &["-r"])?.trim().to_owned(),
            cpu,
        })
    }

    /// `2 cores (model), kernel x`, for a recorded section.
    fn describe(&self) -> String {
        format!(
            "{} cores ({}), kernel {}",
            self.cores, self.cpu, self.kernel
        )
    }
}

/// `value / reference` with two decimals, or `-` without a reference.
fn ratio(value: f64, reference: Option<f64>) -> String {
    reference.filter(|reference| *reference > 0.0).map_or_else(
        || "-".to_owned(),
        |reference| format!("{:.2}", value / reference),
    )
}

/// `0.91×` or `0.85–1.10×`: the range of some ratios, for a recorded reading.
fn span(ratios: &[f64]) -> String {
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if ratios.is_empty() {
        "-".to_owned()
    } else if format!("{low:.2}") == format!("{high:.2}") {
        format!("{low:.2}×")
    } else {
        format!("{low:.2}–{high:.2}×")
    }
}

/// Ends a bench: prints the table, fails when a case failed (recording
/// nothing), and with `record` appends the section `section` renders.
fn report(
    root: &Path,
    record: bool,
    table: &str,
    failures: &[String],
    section: impl FnOnce() -> String,
) -> Result<()> {
    step("results");
    println!("{table}");
    if !failures.is_empty() {
        bail!(
            "{} case(s) failed, nothing recorded:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    if record {
        append_section(&root.join("docs/benchmarks.md"), &section())?;
    }
    Ok(())
}

/// Appends `section` (starting with its `## ` heading) to `path`, creating the
/// file with its introduction.
fn append_section(path: &Path, section: &str) -> Result<()> {
    let mut text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => BENCHMARKS_INTRO.to_owned(),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    text.push('\n');
    text.push_str(section);
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    println!("recorded in {}", path.display());
    Ok(())
}

const BENCHMARKS_INTRO: &str = "# Benchmarks\n\n\
Each benchmark prints its figures next to a reference measured in the same run on the \
same machine, so a number is never read alone. This file records results together \
with the command that produced them; `cargo xtask bench --record <what>` appends a \
section here.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_after_a_name_with_spaces() {
        let stat = "42 (nginx: worker (x)) S 1 42 42 0 -1 4194624 100 0 0 0 \
                    250 30 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(280));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_proc_stat_busy_and_total() {
        let line = "cpu  221394 0 53472 743619 1985 0 7546 2574 0 0";
        assert_eq!(
            parse_proc_stat_cpu(line),
            Some((221_394 + 53_472 + 7_546 + 2_574, 1_030_590))
        );
        assert_eq!(parse_proc_stat_cpu("cpu0 1 2 3"), None);
    }

    #[test]
    fn spans_ratios() {
        assert_eq!(span(&[]), "-");
        assert_eq!(span(&[0.912]), "0.91×");
        assert_eq!(span(&[1.1, 0.85, 0.9]), "0.85–1.10×");
    }

    #[test]
    fn pins_the_server_apart_from_the_load() {
        assert_eq!(Placement::all(1), vec![Placement::Shared]);
        assert_eq!(Placement::Pinned.server_cpus(2), Cpus::Only(vec![1]));
        assert_eq!(Placement::Pinned.load_cpus(4), Cpus::Only(vec![0, 1, 2]));
        assert_eq!(Placement::Shared.server_workers(4), 4);
    }
}
