//! `ployz-tunnel` against the real, independent WireGuard implementation:
//! two network namespaces made by this test, joined by a veth pair; namespace
//! A runs `ployz-tunnel`, namespace B runs `wireguard-go`, and both are
//! configured only with `wg set` from wireguard-tools. Needs root (CI runs as
//! root), `wg` and `wireguard-go` (`cargo xtask setup` installs them).
//! Interface names are unique per test because `wg` finds userspace tunnels
//! at the global path /var/run/wireguard/<interface>.sock.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

const UAPI_DIR: &str = "/var/run/wireguard";
const VETH_A: &str = "10.214.0.1";
const VETH_B: &str = "10.214.0.2";
const PORT: u16 = 51820;

static NEXT_HOSTS: AtomicU32 = AtomicU32::new(0);

/// Runs a command and returns its stdout, failing with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `wg` with `input` on stdin (for `wg pubkey`).
fn wg_with_input(args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run wg")?;
    child
        .stdin
        .take()
        .context("wg stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "wg {} failed", args.join(" "));
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// One side of the test: a namespace, its veth end, its tunnel interface.
struct Host {
    netns: String,
    veth: String,
    tunnel: String,
    address: &'static str,
    private_key_file: PathBuf,
    public_key: String,
    log: PathBuf,
}

impl Host {
    fn socket(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.tunnel))
    }

    /// Runs a command inside this host's namespace.
    fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.netns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

/// Two namespaces joined by a veth pair; A runs ployz-tunnel, B wireguard-go.
/// Dropping it stops both processes and deletes the namespaces, even when the
/// test failed.
struct Hosts {
    a: Host,
    b: Host,
    tunnel_process: Option<Child>,
    wireguard_go: Option<Child>,
    _scratch: tempfile::TempDir,
}

impl Hosts {
    fn create() -> Result<Self> {
        // SAFETY: geteuid only reads the calling process's credentials.
        let euid = unsafe { libc::geteuid() };
        ensure!(
            euid == 0,
            "network namespaces and TUN devices need root (euid is {euid})"
        );
        let scratch = tempfile::tempdir()?;
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT_HOSTS.fetch_add(1, Ordering::Relaxed)
        );
        let host = |side: &str, address| -> Result<Host> {
            let private_key = run("wg", &["genkey"])?.trim().to_owned();
            let public_key = wg_with_input(&["pubkey"], &private_key)?;
            let private_key_file = scratch.path().join(format!("{side}.key"));
            fs::write(&private_key_file, &private_key)?;
            Ok(Host {
                netns: format!("pzt{id}{side}"),
                veth: format!("pzv{id}{side}"),
                tunnel: format!("pzw{id}{side}"),
                address,
                private_key_file,
                public_key,
                log: scratch.path().join(format!("{side}.log")),
            })
        };
        let mut hosts = Self {
            a: host("a", VETH_A)?,
            b: host("b", VETH_B)?,
            tunnel_process: None,
            wireguard_go: None,
            _scratch: scratch,
        };
        hosts.build_network()?;
        hosts.start_tunnels()?;
        Ok(hosts)
    }

    fn build_network(&self) -> Result<()> {
        for host in [&self.a, &self.b] {
            run("ip", &["netns", "add", &host.netns])?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                &self.a.veth,
                "type",
                "veth",
                "peer",
                "name",
                &self.b.veth,
            ],
        )?;
        for host in [&self.a, &self.b] {
            run("ip", &["link", "set", &host.veth, "netns", &host.netns])?;
            let cidr = format!("{}/24", host.address);
            run(
                "ip",
                &["-n", &host.netns, "addr", "add", &cidr, "dev", &host.veth],
            )?;
            run("ip", &["-n", &host.netns, "link", "set", &host.veth, "up"])?;
            run("ip", &["-n", &host.netns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn start_tunnels(&mut self) -> Result<()> {
        let tunnel = Command::new("ip")
            .args(["netns", "exec", &self.a.netns])
            .arg(env!("CARGO_BIN_EXE_ployz-tunnel"))
            .args(["--interface", &self.a.tunnel, "--uapi-dir", UAPI_DIR])
            .env("RUST_LOG", "debug")
            .stdout(fs::File::create(&self.a.log)?)
            .stderr(fs::File::create(&self.a.log)?)
            .spawn()
            .context("cannot start ployz-tunnel")?;
        self.tunnel_process = Some(tunnel);
        let wireguard_go = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.b.netns,
                "wireguard-go",
                "-f",
                &self.b.tunnel,
            ])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(fs::File::create(&self.b.log)?)
            .stderr(fs::File::create(&self.b.log)?)
            .spawn()
            .context("cannot start wireguard-go")?;
        self.wireguard_go = Some(wireguard_go);
        for host in [&self.a, &self.b] {
            self.wait_for_socket(host)?;
        }
        Ok(())
    }

    fn wait_for_socket(&self, host: &Host) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while UnixStream::connect(host.socket()).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "{} never served {}; log: {}",
                    host.tunnel,
                    host.socket().display(),
                    fs::read_to_string(&host.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Configures both ends with `wg set` and gives the tunnels their overlay
    /// addresses.
    fn configure(&self) -> Result<()> {
        for (host, peer, overlay, peer_overlay) in [
            (&self.a, &self.b, "fd00::1", "fd00::2"),
            (&self.b, &self.a, "fd00::2", "fd00::1"),
        ] {
            let key_file = host.private_key_file.to_string_lossy();
            let endpoint = format!("{}:{PORT}", peer.address);
            let allowed = format!("{peer_overlay}/128");
            let port = PORT.to_string();
            host.exec(&[
                "wg",
                "set",
                &host.tunnel,
                "listen-port",
                &port,
                "private-key",
                &key_file,
                "peer",
                &peer.public_key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ])?;
            let cidr = format!("{overlay}/64");
            host.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &cidr,
                "dev",
                &host.tunnel,
                "nodad",
            ])?;
            host.exec(&["ip", "link", "set", &host.tunnel, "up"])?;
        }
        Ok(())
    }

    /// Pings B's overlay address from A.
    fn ping_b_from_a(&self) -> Result<String> {
        self.a
            .exec(&["ping", "-6", "-c", "3", "-W", "2", "fd00::2"])
            .with_context(|| self.logs())
    }

    fn logs(&self) -> String {
        format!(
            "ployz-tunnel log:\n{}\nwireguard-go log:\n{}",
            fs::read_to_string(&self.a.log).unwrap_or_default(),
            fs::read_to_string(&self.b.log).unwrap_or_default()
        )
    }

    /// Sends SIGTERM to ployz-tunnel and waits for it to exit.
    fn stop_tunnel(&mut self) -> Result<ExitStatus> {
        let child = self
            .tunnel_process
            .take()
            .context("tunnel already stopped")?;
        terminate(child).context("ployz-tunnel ignored SIGTERM")
    }
}

/// SIGTERM, then up to 5 s for a clean exit, then SIGKILL. Returns the exit
/// status if the process stopped on SIGTERM.
fn terminate(mut child: Child) -> Option<ExitStatus> {
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    // SAFETY: kill only sends a signal; the pid is our own unreaped child, so
    // it cannot have been recycled for another process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in [self.tunnel_process.take(), self.wireguard_go.take()]
            .into_iter()
            .flatten()
        {
            terminate(child);
        }
        for host in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .status();
            let _ = fs::remove_file(host.socket());
        }
    }
}

/// Sends one raw UAPI request and reads the answer up to its blank line.
fn uapi_exchange(stream: &mut UnixStream, request: &str) -> Result<String> {
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut answer = String::new();
    loop {
        let mut line = String::new();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "connection closed after {answer:?}"
        );
        if line == "\n" {
            return Ok(answer);
        }
        answer.push_str(&line);
    }
}

/// Parses `wg show <iface> <field>` output (`public-key\tvalue...`) for `peer`.
fn wg_show_field(host: &Host, field: &str, peer: &str) -> Result<Vec<u64>> {
    let output = host.exec(&["wg", "show", &host.tunnel, field])?;
    let line = output
        .lines()
        .find(|line| line.starts_with(peer))
        .with_context(|| format!("`wg show {field}` lacks the peer: {output}"))?;
    line.split('\t')
        .skip(1)
        .map(|value| value.trim().parse().context("not a number"))
        .collect()
}

#[test]
fn ployz_tunnel_handshakes_and_carries_pings_with_wireguard_go() -> Result<()> {
    let hosts = Hosts::create()?;
    hosts.configure()?;
    hosts.ping_b_from_a()?;

    let show = hosts.a.exec(&["wg", "show", &hosts.a.tunnel])?;
    eprintln!("wg show in A:\n{show}");
    ensure!(
        show.contains(&hosts.b.public_key),
        "`wg show` lacks the peer: {show}"
    );
    ensure!(
        show.contains("latest handshake"),
        "no handshake in `wg show`: {show}"
    );
    let handshake = wg_show_field(&hosts.a, "latest-handshakes", &hosts.b.public_key)?;
    ensure!(
        handshake.first().is_some_and(|time| *time > 0),
        "no handshake time: {show}"
    );
    let transfer = wg_show_field(&hosts.a, "transfer", &hosts.b.public_key)?;
    ensure!(
        transfer.len() == 2 && transfer.iter().all(|bytes| *bytes > 0),
        "transfer (rx, tx) should both be non-zero: {transfer:?}"
    );
    // The independent peer agrees.
    let remote = wg_show_field(&hosts.b, "latest-handshakes", &hosts.a.public_key)?;
    ensure!(
        remote.first().is_some_and(|time| *time > 0),
        "wireguard-go saw no handshake"
    );
    Ok(())
}

/// Receives one TCP connection on `[address]:port` and prints the byte count
/// and SHA-256 of everything it carried.
const RECEIVER: &str = "
import hashlib, socket, sys
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
server.settimeout(20)
connection, _ = server.accept()
connection.settimeout(20)
digest, count = hashlib.sha256(), 0
while True:
    data = connection.recv(1 << 16)
    if not data:
        break
    digest.update(data)
    count += len(data)
print(count, digest.hexdigest())
";

/// Sends `argv[3]` MiB of seeded pseudo-random bytes to `[address]:port`
/// and prints the byte count and SHA-256 of what it sent.
const SENDER: &str = "
import hashlib, random, socket, sys, time
data = random.Random(7).randbytes(int(sys.argv[3]) << 20)
for attempt in range(50):
    try:
        connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
        break
    except OSError:
        time.sleep(0.1)
connection.sendall(data)
connection.close()
print(len(data), hashlib.sha256(data).hexdigest())
";

/// Sends `mebibytes` over one TCP connection from `from` to `to` (at
/// `address`) and returns what each side counted and hashed.
fn transfer(from: &Host, to: &Host, address: &str, mebibytes: u32) -> Result<(String, String)> {
    let port = "7070";
    let receiver = Command::new("ip")
        .args([
            "netns", "exec", &to.netns, "python3", "-c", RECEIVER, address, port,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the receiver")?;
    let sent = from.exec(&[
        "python3",
        "-c",
        SENDER,
        address,
        port,
        &mebibytes.to_string(),
    ]);
    let received = receiver.wait_with_output().context("the receiver")?;
    let sent = sent?;
    ensure!(
        received.status.success(),
        "receiver failed: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    Ok((
        sent.trim().to_owned(),
        String::from_utf8_lossy(&received.stdout).trim().to_owned(),
    ))
}

#[test]
fn bulk_tcp_crosses_the_batched_data_path_intact_both_ways() -> Result<()> {
    let hosts = Hosts::create()?;
    hosts.configure()?;
    hosts.ping_b_from_a()?;
    // Large enough that the kernel hands the TUN whole bursts (offload) and
    // both sides coalesce datagrams (GSO/GRO).
    let (sent, received) = transfer(&hosts.a, &hosts.b, "fd00::2", 32)?;
    ensure!(
        sent.starts_with("33554432 ") && sent == received,
        "ployz-tunnel -> wireguard-go: sent {sent:?}, received {received:?}\n{}",
        hosts.logs()
    );
    let (sent, received) = transfer(&hosts.b, &hosts.a, "fd00::1", 32)?;
    ensure!(
        sent.starts_with("33554432 ") && sent == received,
        "wireguard-go -> ployz-tunnel: sent {sent:?}, received {received:?}\n{}",
        hosts.logs()
    );
    Ok(())
}

#[test]
fn malformed_uapi_set_gets_an_errno_and_the_tunnel_keeps_serving() -> Result<()> {
    let mut hosts = Hosts::create()?;
    let mut stream = UnixStream::connect(hosts.a.socket())?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    for malformed in [
        "set=1\nlisten_port=not-a-port\n\n",
        "set=1\nno equals sign here\n\n",
        "set=1\nendpoint=10.0.0.1:1\n\n",
        "set=1\npublic_key=abcd\n\n",
        "bogus=1\n\n",
    ] {
        let answer = uapi_exchange(&mut stream, malformed)?;
        ensure!(
            answer.starts_with("errno=") && answer != "errno=0\n",
            "{malformed:?} answered {answer:?}"
        );
    }
    // The same connection still answers, and nothing was applied.
    let answer = uapi_exchange(&mut stream, "get=1\n\n")?;
    ensure!(answer.ends_with("errno=0\n"), "get answered {answer:?}");
    ensure!(
        !answer.contains("private_key"),
        "a rejected set changed state: {answer:?}"
    );
    drop(stream);

    hosts.configure()?;
    hosts.ping_b_from_a()?;

    let status = hosts.stop_tunnel()?;
    ensure!(
        status.success(),
        "ployz-tunnel exited with {status} on SIGTERM"
    );
    ensure!(
        !hosts.a.socket().exists(),
        "the UAPI socket outlived the tunnel"
    );
    Ok(())
}
