//! `cargo xtask bench overlay`: TCP throughput and ping latency between two
//! network namespaces over the raw veth, over wireguard-go and over
//! `ployz-tunnel`. Needs root, iperf3, ping, wg and wireguard-go (`cargo xtask
//! setup` installs them).

use std::{
    fmt::Write as _,
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{Guard, Machine, append_section, check_interrupted, output};
use crate::{cargo, step};

/// The command line that reproduces a run, written next to its figures.
const OVERLAY_COMMAND: &str = "cargo xtask bench --record overlay";
const UAPI_DIR: &str = "/var/run/wireguard";
const VETH_A: &str = "10.215.0.1";
const VETH_B: &str = "10.215.0.2";
const OVERLAY_A: &str = "fd00::1";
const OVERLAY_B: &str = "fd00::2";
const WIREGUARD_PORT: u16 = 51820;
const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: &str = "5";

/// Runs the overlay benchmark; with `record`, appends its figures to docs/benchmarks.md.
pub(super) fn run(root: &Path, record: bool) -> Result<()> {
    // SAFETY: geteuid only reads the calling process's credentials.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "network namespaces and TUN devices need root (euid is {euid})"
    );
    for tool in ["ip", "iperf3", "ping", "wg", "wireguard-go"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success()),
            "`{tool}` is missing; run `cargo xtask setup`"
        );
    }
    super::stop_on_signals();

    step("building ployz-tunnel (release)");
    crate::run(cargo(root).args([
        "build",
        "--release",
        "-p",
        "ployzd",
        "--bin",
        "ployz-tunnel",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let ployz_tunnel = target_dir.join("release/ployz-tunnel");

    let testbed = Testbed::create()?;
    let mut results = Vec::new();

    step("raw veth");
    results.push(testbed.measure("raw veth", VETH_B)?);

    for implementation in [
        Implementation::WireguardGo,
        Implementation::PloyzTunnel(&ployz_tunnel),
    ] {
        check_interrupted()?;
        step(implementation.name());
        let tunnels = testbed.start_tunnels(implementation)?;
        tunnels.configure()?;
        results.push(testbed.measure(implementation.name(), OVERLAY_B)?);
        drop(tunnels);
    }
    drop(testbed);

    let report = Report::new(results)?;
    step("results");
    println!("{}", report.table());
    if record {
        let path = root.join("docs/benchmarks.md");
        report.record(&path)?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}

/// One end of the benchmark: a namespace and its veth end.
struct Host {
    netns: String,
    veth: String,
    address: &'static str,
}

impl Host {
    /// Runs a command inside this host's namespace and returns its stdout.
    fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.netns.as_str()];
        full.extend_from_slice(args);
        output("ip", &full)
    }

    /// A command that will run inside this host's namespace.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }
}

/// Two namespaces joined by a veth pair. Dropping it deletes both namespaces
/// (and with them the veth pair and any leftover TUN device).
struct Testbed {
    a: Host,
    b: Host,
    id: String,
    scratch: PathBuf,
}

impl Testbed {
    fn create() -> Result<Self> {
        // The pid makes names unique among concurrent runs; IFNAMSIZ is 16.
        let id = std::process::id().to_string();
        let host = |side: &str, address| Host {
            netns: format!("pzb{id}{side}"),
            veth: format!("pzv{id}{side}"),
            address,
        };
        let scratch = std::env::temp_dir().join(format!("ployz-bench-{id}"));
        fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        let testbed = Self {
            a: host("a", VETH_A),
            b: host("b", VETH_B),
            id,
            scratch,
        };
        for host in [&testbed.a, &testbed.b] {
            output("ip", &["netns", "add", &host.netns])?;
        }
        output(
            "ip",
            &[
                "link",
                "add",
                &testbed.a.veth,
                "type",
                "veth",
                "peer",
                "name",
                &testbed.b.veth,
            ],
        )?;
        for host in [&testbed.a, &testbed.b] {
            output("ip", &["link", "set", &host.veth, "netns", &host.netns])?;
            let cidr = format!("{}/24", host.address);
            output(
                "ip",
                &["-n", &host.netns, "addr", "add", &cidr, "dev", &host.veth],
            )?;
            output("ip", &["-n", &host.netns, "link", "set", &host.veth, "up"])?;
            output("ip", &["-n", &host.netns, "link", "set", "lo", "up"])?;
        }
        Ok(testbed)
    }

    /// iperf3 (one TCP stream, A to B) and ping (A to B) against `target`, B's address.
    fn measure(&self, case: &str, target: &str) -> Result<Measurement> {
        let server = Guard(
            self.b
                .command("iperf3")
                .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start iperf3 -s")?,
        );
        self.wait_for_iperf_server()?;
        let json = self.a.exec(&[
            "iperf3",
            "-c",
            target,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            IPERF_SECONDS,
            "-J",
        ])?;
        drop(server);
        let bits_per_second = parse_iperf_bits_per_second(&json)?;
        let ping = self
            .a
            .exec(&["ping", "-c", "20", "-i", "0.05", "-W", "2", target])?;
        let (ping_avg_ms, ping_mdev_ms) = parse_ping_rtt(&ping)?;
        let measurement = Measurement {
            case: case.to_owned(),
            gbit_per_second: bits_per_second / 1e9,
            ping_avg_ms,
            ping_mdev_ms,
        };
        println!(
            "{case}: {:.2} Gbit/s, ping avg {:.3} ms (mdev {:.3})",
            measurement.gbit_per_second, ping_avg_ms, ping_mdev_ms
        );
        Ok(measurement)
    }

    fn wait_for_iperf_server(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{IPERF_PORT}");
        while self.b.exec(&["ss", "-Hltn", &filter])?.trim().is_empty() {
            ensure!(Instant::now() < deadline, "iperf3 -s never listened");
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts `implementation` in both namespaces and waits for their UAPI sockets.
    fn start_tunnels(&self, implementation: Implementation<'_>) -> Result<Tunnels<'_>> {
        let mut tunnels = Tunnels {
            testbed: self,
            ends: Vec::new(),
        };
        for (host, overlay, side) in [(&self.a, OVERLAY_A, 'a'), (&self.b, OVERLAY_B, 'b')] {
            let interface = format!("pzb{}{}{side}", self.id, implementation.letter());
            let log = self
                .scratch
                .join(format!("{}-{side}.log", implementation.letter()));
            let mut command = match implementation {
                Implementation::WireguardGo => {
                    let mut command = host.command("wireguard-go");
                    command
                        .args(["-f", &interface])
                        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
                    command
                }
                Implementation::PloyzTunnel(binary) => {
                    let mut command = host.command(&binary.to_string_lossy());
                    command
                        .args(["--interface", &interface, "--uapi-dir", UAPI_DIR])
                        .env("RUST_LOG", "warn");
                    command
                }
            };
            let log_file = fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let process = command
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .with_context(|| format!("cannot start {}", implementation.name()))?;
            tunnels.ends.push(TunnelEnd {
                host,
                interface,
                overlay,
                log,
                process: Guard(process),
            });
        }
        for end in &tunnels.ends {
            end.wait_for_socket()?;
        }
        Ok(tunnels)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for host in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

/// The userspace WireGuard implementations under test.
#[derive(Clone, Copy)]
enum Implementation<'a> {
    WireguardGo,
    PloyzTunnel(&'a Path),
}

impl Implementation<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::WireguardGo => "wireguard-go",
            Self::PloyzTunnel(_) => "ployz-tunnel",
        }
    }

    /// Tells the interface names apart, so a new TUN never waits for an old one.
    fn letter(&self) -> char {
        match self {
            Self::WireguardGo => 'g',
            Self::PloyzTunnel(_) => 'p',
        }
    }
}

/// One tunnel process and its interface.
struct TunnelEnd<'a> {
    host: &'a Host,
    interface: String,
    overlay: &'static str,
    log: PathBuf,
    process: Guard,
}

impl TunnelEnd<'_> {
    fn socket(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.interface))
    }

    fn wait_for_socket(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while UnixStream::connect(self.socket()).is_err() {
            check_interrupted()?;
            ensure!(
                Instant::now() < deadline,
                "{} never served {}; log:\n{}",
                self.interface,
                self.socket().display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Both ends of one implementation; dropping it stops both processes.
struct Tunnels<'a> {
    testbed: &'a Testbed,
    ends: Vec<TunnelEnd<'a>>,
}

impl Tunnels<'_> {
    /// Configures both ends with `wg set`, gives the interfaces their overlay
    /// addresses and waits for the handshake (a ping that gets through).
    fn configure(&self) -> Result<()> {
        let mut keys = Vec::new();
        for end in &self.ends {
            let private_key = output("wg", &["genkey"])?.trim().to_owned();
            let public_key = wg_pubkey(&private_key)?;
            let key_file = self.testbed.scratch.join(format!("{}.key", end.interface));
            fs::write(&key_file, &private_key)
                .with_context(|| format!("cannot write {}", key_file.display()))?;
            keys.push((key_file, public_key));
        }
        for (index, end) in self.ends.iter().enumerate() {
            let peer_index = 1 - index;
            let peer = &self.ends[peer_index];
            let key_file = keys[index].0.to_string_lossy().into_owned();
            let endpoint = format!("{}:{WIREGUARD_PORT}", peer.host.address);
            let allowed = format!("{}/128", peer.overlay);
            end.host.exec(&[
                "wg",
                "set",
                &end.interface,
                "listen-port",
                &WIREGUARD_PORT.to_string(),
                "private-key",
                &key_file,
                "peer",
                &keys[peer_index].1,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ])?;
            let cidr = format!("{}/64", end.overlay);
            end.host.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &cidr,
                "dev",
                &end.interface,
                "nodad",
            ])?;
            end.host
                .exec(&["ip", "link", "set", &end.interface, "up"])?;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self
            .testbed
            .a
            .exec(&["ping", "-c", "1", "-W", "1", OVERLAY_B])
            .is_err()
        {
            check_interrupted()?;
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .ends
                    .iter()
                    .map(|end| fs::read_to_string(&end.log).unwrap_or_default())
                    .collect();
                bail!("no ping across the overlay; logs:\n{}", logs.join("\n"));
            }
        }
        Ok(())
    }
}

impl Drop for Tunnels<'_> {
    fn drop(&mut self) {
        // Stop the processes first (the guards), then remove stale sockets.
        let sockets: Vec<PathBuf> = self.ends.iter().map(TunnelEnd::socket).collect();
        for end in self.ends.drain(..) {
            drop(end.process);
        }
        for socket in sockets {
            let _ = fs::remove_file(socket);
        }
    }
}

/// `wg pubkey` for `private_key`.
fn wg_pubkey(private_key: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run wg pubkey")?;
    child
        .stdin
        .take()
        .context("wg pubkey has no stdin")?
        .write_all(private_key.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "wg pubkey failed");
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The bits per second the receiver counted (`end.sum_received`).
fn parse_iperf_bits_per_second(json: &str) -> Result<f64> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("iperf3 -J printed no JSON")?;
    if let Some(error) = value["error"].as_str() {
        bail!("iperf3: {error}");
    }
    value["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON lacks end.sum_received.bits_per_second")
}

/// The average and mean deviation from ping's `rtt min/avg/max/mdev = a/b/c/d ms`.
fn parse_ping_rtt(text: &str) -> Result<(f64, f64)> {
    let line = text
        .lines()
        .find(|line| line.starts_with("rtt ") || line.starts_with("round-trip "))
        .with_context(|| format!("ping printed no rtt summary:\n{text}"))?;
    let values = line
        .split('=')
        .nth(1)
        .context("rtt line lacks `=`")?
        .trim()
        .trim_end_matches("ms")
        .trim();
    let numbers: Vec<f64> = values
        .split('/')
        .map(|value| value.trim().parse().context("rtt value is not a number"))
        .collect::<Result<_>>()?;
    ensure!(numbers.len() == 4, "unexpected rtt line: {line}");
    Ok((numbers[1], numbers[3]))
}

/// One case's figures.
struct Measurement {
    case: String,
    gbit_per_second: f64,
    ping_avg_ms: f64,
    ping_mdev_ms: f64,
}

/// The figures of one run and where they were measured.
struct Report {
    measurements: Vec<Measurement>,
    machine: Machine,
}

impl Report {
    fn new(measurements: Vec<Measurement>) -> Result<Self> {
        Ok(Self {
            measurements,
            machine: Machine::probe()?,
        })
    }

    fn throughput_of(&self, case: &str) -> Option<f64> {
        self.measurements
            .iter()
            .find(|measurement| measurement.case == case)
            .map(|measurement| measurement.gbit_per_second)
    }

    /// A Markdown table: readable in a terminal and in the docs.
    fn table(&self) -> String {
        let raw = self.throughput_of("raw veth");
        let wireguard_go = self.throughput_of("wireguard-go");
        let ratio = |value: f64, reference: Option<f64>| {
            reference.filter(|reference| *reference > 0.0).map_or_else(
                || "-".to_owned(),
                |reference| format!("{:.2}", value / reference),
            )
        };
        let mut table = String::from(
            "| case | Gbit/s | ping avg ms (mdev) | vs wireguard-go | vs raw veth |\n\
             |---|---:|---:|---:|---:|\n",
        );
        for measurement in &self.measurements {
            let _ = writeln!(
                table,
                "| {} | {:.2} | {:.3} ({:.3}) | {} | {} |",
                measurement.case,
                measurement.gbit_per_second,
                measurement.ping_avg_ms,
                measurement.ping_mdev_ms,
                ratio(measurement.gbit_per_second, wireguard_go),
                ratio(measurement.gbit_per_second, raw),
            );
        }
        table
    }

    /// Appends this run to `path`.
    fn record(&self, path: &Path) -> Result<()> {
        let machine = &self.machine;
        append_section(
            path,
            &format!(
                "## overlay, {date}\n\n\
                 Command: `{OVERLAY_COMMAND}` (as root). Machine: {cores} cores ({cpu}), \
                 kernel {kernel}. One TCP stream, iperf3 for {IPERF_SECONDS} s from namespace A \
                 to B; `ping -c 20 -i 0.05`.\n\n{table}",
                date = machine.date,
                cores = machine.cores,
                cpu = machine.cpu,
                kernel = machine.kernel,
                table = self.table(),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let text = "20 packets transmitted, 20 received, 0% packet loss, time 970ms\n\
                    rtt min/avg/max/mdev = 0.031/0.052/0.094/0.015 ms\n";
        let (avg, mdev) = parse_ping_rtt(text).expect("a valid summary");
        assert!((avg - 0.052).abs() < 1e-9);
        assert!((mdev - 0.015).abs() < 1e-9);
    }

    #[test]
    fn parses_iperf_receiver_rate_and_reports_errors() {
        let json = r#"{"end":{"sum_received":{"bits_per_second":1.5e10}}}"#;
        let rate = parse_iperf_bits_per_second(json).expect("a valid report");
        assert!((rate - 1.5e10).abs() < 1.0);
        let failed = r#"{"error":"unable to connect"}"#;
        assert!(parse_iperf_bits_per_second(failed).is_err());
    }
}
