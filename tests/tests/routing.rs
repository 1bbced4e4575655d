//! End-to-end routing: a real ployzd runs the gateway and DNS beside NATS;
//! deploys of real Docker containers are reached the way a user would, with
//! HTTP through the gateway (`curl`) and `dig` against ployz-dns.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ployz_tests::{
    Node, binary, docker, image::ensure_example_image, kill, process_alive, wait_until, write_file,
};
use serde_json::Value;

const IMAGE: &str = "ployz-example:e2e";

/// A node whose daemon runs the gateway and DNS on its own loopback ports;
/// removes its namespace's containers and stops everything on drop.
struct RoutingNode {
    node: Node,
    namespace: String,
}

impl RoutingNode {
    fn new(namespace: &str) -> Self {
        ensure_example_image(IMAGE).expect("build the example image");
        let routing = Self {
            node: Node::new(),
            namespace: namespace.to_owned(),
        };
        routing.remove_containers();
        routing.node.start_daemon();
        routing.node.ployzctl_json(&["mesh", "init", "e2e"]);
        routing
    }

    /// Deploys `manifest` (with `{namespace}` and `{image}` filled in).
    fn deploy(&self, name: &str, manifest: &str) -> Value {
        let text = manifest
            .replace("{namespace}", &self.namespace)
            .replace("{image}", IMAGE);
        let path = write_file(self.node.dir(), name, &text).expect("write manifest");
        let path = path.display().to_string();
        let run = self.node.ployzctl(&["--json", "deploy", "-f", &path]);
        assert!(
            run.succeeded(),
            "deploy failed: {}{}",
            run.stdout,
            run.stderr
        );
        run.json()
    }

    /// `GET /` through the gateway with `host`.
    fn get(&self, host: &str) -> Result<(u16, String), String> {
        http_get(self.node.http_port, host)
    }

    /// `dig` against this node's ployz-dns; the answers, one per line.
    fn dig(&self, name: &str, kind: &str) -> Vec<String> {
        dig(self.node.dns_port, name, kind)
    }

    fn status(&self) -> Value {
        self.node.ployzctl_json(&["status"])
    }

    fn routing_pids(&self) -> (u32, u32) {
        let status = self.status();
        let pid = |component: &str| {
            status[component]["pid"]
                .as_u64()
                .and_then(|pid| u32::try_from(pid).ok())
                .filter(|pid| *pid > 0)
                .unwrap_or_else(|| panic!("no {component} pid in {status:#}"))
        };
        (pid("gateway"), pid("dns"))
    }

    /// Addresses of the namespace's running containers, as Docker reports them.
    fn container_addresses(&self) -> Vec<String> {
        let filter = format!("label=ployz.namespace={}", self.namespace);
        docker(&["ps", "-q", "--filter", &filter])
            .split_whitespace()
            .map(|id| {
                docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", id])
                    .trim()
                    .to_owned()
            })
            .collect()
    }

    fn remove_containers(&self) {
        let filter = format!("label=ployz.namespace={}", self.namespace);
        for id in docker(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

impl Drop for RoutingNode {
    fn drop(&mut self) {
        self.remove_containers();
    }
}

/// One HTTP/1.1 request on a fresh connection; the status and the body.
fn http_get(port: u16, host: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .map_err(|error| format!("connect: {error}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|error| error.to_string())?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|error| format!("send: {error}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|error| format!("read: {error}"))?;
    parse_response(&answer)
}

fn parse_response(answer: &str) -> Result<(u16, String), String> {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok((status, body.trim().to_owned()))
}

fn dig(port: u16, name: &str, kind: &str) -> Vec<String> {
    let output = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            kind,
            "+short",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("run dig (apt package dnsutils)");
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|line| !line.is_empty() && !line.starts_with(';'))
        .collect();
    lines.sort();
    lines
}

/// `dig` with the full answer, for the response code.
fn dig_status(port: u16, name: &str) -> String {
    let output = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            "A",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("run dig");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("no answer")
        .to_owned()
}

fn web(version: &str) -> String {
    format!(
        r#"
namespace = "{{namespace}}"

[services.web]
image = "{{image}}"
command = ["sh", "-c", "mkdir -p /www && echo {version} > /www/index.html && exec httpd -f -p 8080 -h /www"]
ports = [8080]
stop_grace_period = "1s"
health = {{ http = {{ port = 8080, path = "/" }}, interval = "100ms", retries = 50 }}

[[services.web.routes]]
hosts = ["web.{{namespace}}.test"]
port = 8080
"#
    )
}

#[test]
fn a_deploy_is_served_by_name_and_flips_traffic_at_its_commit_without_a_failed_request() {
    let node = RoutingNode::new("rt-flip");
    let host = "web.rt-flip.test";
    node.deploy("v1.toml", &web("v1"));

    assert_eq!(node.get(host), Ok((200, "v1".to_owned())));
    let unknown = node.get("nobody.test").expect("the gateway answers");
    assert_eq!(unknown.0, 404, "an unknown host is a 404: {unknown:?}");
    let addresses = node.container_addresses();
    assert_eq!(node.dig("web.rt-flip.ployz.internal", "A"), addresses);
    assert_eq!(
        node.dig("_8080._tcp.web.rt-flip.ployz.internal", "SRV")
            .len(),
        1,
        "one SRV record for the one instance"
    );
    assert_eq!(
        dig_status(node.node.dns_port, "nope.rt-flip.ployz.internal"),
        "NXDOMAIN"
    );

    // A client loops on the gateway while v2 deploys.
    let stop = Arc::new(AtomicBool::new(false));
    let port = node.node.http_port;
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                answers.push(http_get(port, "web.rt-flip.test"));
            }
            answers
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let deployed = node.deploy("v2.toml", &web("v2"));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let answers = client.join().expect("the client thread");

    let failed: Vec<_> = answers
        .iter()
        .filter(|answer| !matches!(answer, Ok((200, _))))
        .collect();
    assert!(
        failed.is_empty(),
        "failed requests during the flip: {failed:?}"
    );
    let bodies: Vec<&str> = answers
        .iter()
        .filter_map(|answer| answer.as_ref().ok())
        .map(|(_, body)| body.as_str())
        .collect();
    let first_v2 = bodies
        .iter()
        .position(|body| *body == "v2")
        .expect("v2 answered after its deploy");
    assert!(first_v2 > 0, "v1 answered before the flip");
    assert!(
        bodies[..first_v2].iter().all(|body| *body == "v1")
            && bodies[first_v2..].iter().all(|body| *body == "v2"),
        "only v1, then only v2: {bodies:?}"
    );
    eprintln!(
        "{} requests during the deploy, flip after {first_v2}; deploy: {deployed}",
        bodies.len()
    );

    // DNS follows the same commit, and both say so themselves.
    assert_eq!(
        node.dig("web.rt-flip.ployz.internal", "A"),
        node.container_addresses()
    );
    let routes = node.node.ployzctl_json(&["routes", "ls", "rt-flip"]);
    for process in routes["processes"].as_array().expect("processes") {
        assert_eq!(process["reachable"], true, "{process:#}");
        assert_eq!(process["origin"], "store", "{process:#}");
        assert_eq!(
            process["namespaces"][0]["commit"], "rt-flip/2",
            "{process:#}"
        );
    }
}

#[test]
fn the_gateway_and_dns_outlive_ployzd_and_nats_and_are_adopted_with_their_pids() {
    let node = RoutingNode::new("rt-adopt");
    let host = "web.rt-adopt.test";
    node.deploy("v1.toml", &web("v1"));
    let addresses = node.container_addresses();
    let (gateway, dns) = node.routing_pids();
    let nats = node.node.nats_pid();

    // ployzd dies, then NATS: the data plane keeps answering.
    let daemon = node.node.daemon_pid().expect("daemon pid");
    kill(daemon, libc::SIGKILL);
    wait_until(Duration::from_secs(5), "ployzd to die", || {
        !process_alive(daemon)
    })
    .expect("ployzd dies");
    kill(nats, libc::SIGKILL);
    wait_until(Duration::from_secs(5), "NATS to die", || {
        !process_alive(nats)
    })
    .expect("NATS dies");
    for _ in 0..20 {
        assert_eq!(node.get(host), Ok((200, "v1".to_owned())));
        assert_eq!(node.dig("web.rt-adopt.ployz.internal", "A"), addresses);
    }

    // ployzd comes back: it restarts NATS and adopts the gateway and DNS.
    node.node.start_daemon();
    assert_eq!(
        node.routing_pids(),
        (gateway, dns),
        "adopted, not restarted"
    );
    let status = node.status();
    assert_eq!(status["gateway"]["origin"], "adopted", "{status:#}");
    assert_eq!(status["dns"]["origin"], "adopted", "{status:#}");
    assert_eq!(node.get(host), Ok((200, "v1".to_owned())));

    // Without ployzd and NATS, a restarted gateway serves its last good table.
    node.node.stop_daemon();
    let nats = node.node.recorded_nats_pid().expect("NATS pid");
    kill(nats, libc::SIGKILL);
    kill(gateway, libc::SIGKILL);
    wait_until(Duration::from_secs(5), "the gateway to die", || {
        !process_alive(gateway)
    })
    .expect("gateway dies");
    let config = node.node.data_dir().join("gateway/gateway.toml");
    let mut restarted = Command::new(binary("ployz-gateway"))
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(node.node.dir().join("gateway-restart.log")).expect("log"))
        .spawn()
        .expect("start the gateway by hand");
    let served = wait_until(Duration::from_secs(10), "the restarted gateway", || {
        node.get(host) == Ok((200, "v1".to_owned()))
    });
    let _ = restarted.kill();
    let _ = restarted.wait();
    served.expect("a restarted gateway serves its last good table without NATS");
}

/// A self-signed certificate for `host`, written as `<host>.pem` and `<host>.key`.
fn certificate(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{host}.pem"));
    let key = dir.join(format!("{host}.key"));
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={host}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{host}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

/// `curl` over HTTPS with SNI `host`, trusting only `ca`.
fn curl_https(port: u16, host: &str, ca: &Path) -> Result<String, String> {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--resolve"])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{host}:{port}/"))
        .output()
        .expect("run curl");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

#[test]
fn https_picks_the_certificate_by_sni_and_bad_input_crashes_nothing() {
    let node = RoutingNode::new("rt-tls");
    let dir = node.node.dir();
    let (a_cert, a_key) = certificate(dir, "a.rt-tls.test");
    let (b_cert, b_key) = certificate(dir, "b.rt-tls.test");
    let manifest = format!(
        r#"
namespace = "{{namespace}}"

[services.a]
image = "{{image}}"
command = ["sh", "-c", "mkdir -p /www && echo service-a > /www/index.html && exec httpd -f -p 8080 -h /www"]
stop_grace_period = "1s"
health = {{ http = {{ port = 8080, path = "/" }}, interval = "100ms", retries = 50 }}

[[services.a.routes]]
hosts = ["a.rt-tls.test"]
port = 8080
tls = {{ certificate = "{}", key = "{}" }}

[services.b]
image = "{{image}}"
command = ["sh", "-c", "mkdir -p /www && echo service-b > /www/index.html && exec httpd -f -p 8080 -h /www"]
stop_grace_period = "1s"
health = {{ http = {{ port = 8080, path = "/" }}, interval = "100ms", retries = 50 }}

[[services.b.routes]]
hosts = ["b.rt-tls.test"]
port = 8080
tls = {{ certificate = "{}", key = "{}" }}
"#,
        a_cert.display(),
        a_key.display(),
        b_cert.display(),
        b_key.display()
    );
    node.deploy("tls.toml", &manifest);
    let port = node.node.https_port;

    // Each host gets its own certificate: each verifies against only its own.
    let a = wait_until(Duration::from_secs(5), "HTTPS for a", || {
        curl_https(port, "a.rt-tls.test", &a_cert).is_ok()
    });
    a.expect("a.rt-tls.test over HTTPS");
    assert_eq!(
        curl_https(port, "a.rt-tls.test", &a_cert),
        Ok("service-a".to_owned())
    );
    assert_eq!(
        curl_https(port, "b.rt-tls.test", &b_cert),
        Ok("service-b".to_owned())
    );
    assert!(
        curl_https(port, "a.rt-tls.test", &b_cert).is_err(),
        "a's certificate is not b's"
    );

    // Hostile input, then the same answers from the same processes.
    let (gateway, dns) = node.routing_pids();
    let http = node.node.http_port;
    for garbage in [
        b"\x16\x03\x01\x00\xff garbage\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n".to_vec(),
        b"GET /\0 HTTP/9.9\r\n\r\n".to_vec(),
        [
            b"GET / HTTP/1.1\r\nHost: a.rt-tls.test\r\nX-Big: ".to_vec(),
            vec![b'x'; 200_000],
            b"\r\n\r\n".to_vec(),
        ]
        .concat(),
        vec![0xff; 70_000],
    ] {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", http)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.write_all(&garbage);
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            let text = String::from_utf8_lossy(&answer);
            assert!(
                answer.is_empty() || text.starts_with("HTTP/1.1 4"),
                "hostile HTTP gets a 4xx or a close: {text:.200}"
            );
        }
    }
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let dns_addr = ("127.0.0.1", node.node.dns_port);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..20_000u32 {
        // xorshift: random lengths and bytes, plus truncated real headers.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let length = (seed % 600) as usize;
        let packet: Vec<u8> = (0..length)
            .map(|i| (seed.rotate_left((i % 64) as u32) as u8) ^ (round as u8))
            .collect();
        let _ = socket.send_to(&packet, dns_addr);
    }
    assert_eq!(
        node.routing_pids(),
        (gateway, dns),
        "neither process restarted"
    );
    assert!(process_alive(gateway) && process_alive(dns));
    assert_eq!(
        node.dig("a.rt-tls.ployz.internal", "A").len(),
        1,
        "DNS still answers after the storm"
    );
    assert_eq!(
        curl_https(port, "b.rt-tls.test", &b_cert),
        Ok("service-b".to_owned())
    );
}

/// The Docker bridge's address on this host.
fn docker_bridge_ip() -> String {
    let output = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "docker0"])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(3)
        .and_then(|cidr| cidr.split('/').next())
        .expect("docker0 has an IPv4 address")
        .to_owned()
}

#[test]
fn workload_containers_resolve_services_through_ployz_dns() {
    ensure_example_image(IMAGE).expect("build the example image");
    let routing = RoutingNode {
        node: Node::new(),
        namespace: "rt-names".to_owned(),
    };
    routing.remove_containers();
    // Port 53 on the bridge: the only port a container's resolv.conf can name.
    let listen = format!(
        "127.0.0.1:{},{}:53",
        routing.node.dns_port,
        docker_bridge_ip()
    );
    routing.node.start_daemon_with(&["--dns-listen", &listen]);
    routing.node.ployzctl_json(&["mesh", "init", "e2e"]);
    routing.deploy("v1.toml", &web("v1"));
    let address = routing.container_addresses().pop().expect("one container");

    let filter = "label=ployz.namespace=rt-names";
    let id = docker(&["ps", "-q", "--filter", filter]).trim().to_owned();
    let resolv = docker(&["exec", &id, "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains(&format!("nameserver {}", docker_bridge_ip()))
            && resolv.contains("search rt-names.ployz.internal"),
        "the container resolves through ployz-dns: {resolv}"
    );
    for name in ["web.rt-names.ployz.internal", "web"] {
        let answer = docker(&["exec", &id, "nslookup", name]);
        assert!(
            answer.contains(&address),
            "`{name}` resolves to {address} inside the container: {answer}"
        );
    }
}

#[test]
fn a_tcp_route_reaches_a_non_http_service_through_the_gateway() {
    let node = RoutingNode::new("rt-tcp");
    let port = ployz_tests::free_port();
    let manifest = format!(
        r#"
namespace = "{{namespace}}"

[services.echo]
image = "{{image}}"
command = ["sh", "-c", "while true; do echo pong | nc -l -p 9000; done"]
stop_grace_period = "1s"

[[services.echo.routes]]
tcp = {port}
port = 9000
"#
    );
    node.deploy("tcp.toml", &manifest);
    let answer = || -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text.trim().to_owned())
    };
    wait_until(
        Duration::from_secs(10),
        "pong through the TCP route",
        || answer().as_deref() == Some("pong"),
    )
    .expect("the gateway forwards TCP to the service");
    let routes = node.node.ployzctl_json(&["routes", "ls", "rt-tcp"]);
    let gateway = &routes["processes"][0];
    assert_eq!(gateway["component"], "gateway");
    assert_eq!(
        gateway["namespaces"][0]["routes"][0]["matches"][0],
        format!(":{port}"),
        "{gateway:#}"
    );
}
