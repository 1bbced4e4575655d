//! `cargo xtask bench gateway`: HTTP requests per second and p99 latency with
//! wrk through nginx as a reverse proxy (the reference) and through
//! `ployz-gateway`, both in front of the same nginx backend serving a 100-byte
//! body, which is also measured directly as the ceiling. Needs nginx and wrk.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use ployz_routing::{HttpRoute, NamespaceTable, RoutingTable, config, source};

use super::{
    Cpus, Load, Machine, MachineMeter, OTHER_CPU_WARNING_PERCENT, Placement, Scratch, Server,
    background_cpu_percent, build_release, check_interrupted, cpu_micros_per_request, ensure_tools,
    free_port, ratio, report, run_load, span, stop_on_signals, warn_if_busy,
};
use crate::step;

/// The command line that reproduces a run, written next to its figures.
const COMMAND: &str = "cargo xtask bench --record gateway";
const HOST: &str = "bench.test";
const CONNECTIONS: [u32; 2] = [64, 256];
const WRK_THREADS: u32 = 2;
const SECONDS: u32 = 5;
const WARM_UP_SECONDS: u32 = 1;
/// Each worker may hold a client and an upstream connection per request.
const WORKER_CONNECTIONS: u32 = 4096;

/// What serves the requests in one row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    /// The backend without a proxy: the ceiling.
    Direct,
    /// The reference: nginx with `proxy_pass` and an upstream keepalive pool.
    Nginx,
    /// ployz-gateway.
    Gateway,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "backend direct",
            Self::Nginx => "nginx proxy",
            Self::Gateway => "ployz-gateway",
        }
    }
}

/// One wrk run.
struct Row {
    placement: Placement,
    case: Case,
    connections: u32,
    figures: WrkFigures,
    /// CPU of the server wrk talked to (the proxy, or the backend when direct).
    server_cpu_percent: f64,
    backend_cpu_percent: f64,
    load_cpu_percent: f64,
    /// Machine CPU outside the processes above, loopback softirq work included.
    other_cpu_percent: f64,
}

/// Runs the gateway benchmark; with `record`, appends its figures to docs/benchmarks.md.
pub(super) fn run(root: &Path, record: bool) -> Result<()> {
    ensure_tools(&[("nginx", "nginx"), ("wrk", "wrk")])?;
    stop_on_signals();
    let gateway = build_release(root, "ployz-gateway")?;
    let machine = Machine::probe()?;
    let scratch = Scratch::create("gateway")?;
    let background = background_cpu_percent()?;
    let body = backend_body();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for placement in Placement::all(machine.cores) {
        let load_cpus = placement.load_cpus(machine.cores);
        step(&format!(
            "{}: backend and wrk on {}, proxy on {} with {} worker(s)",
            placement.name(),
            load_cpus.describe(),
            placement.server_cpus(machine.cores).describe(),
            placement.server_workers(machine.cores),
        ));
        let mut backend = start_nginx(
            &scratch,
            &format!("backend-{}", placement.name()),
            1,
            &load_cpus,
            |port| backend_server(port, &body),
        )?;
        backend.wait_ready(|port| expect_body(port, &body))?;
        let backend_address = SocketAddr::from((Ipv4Addr::LOCALHOST, backend.port));
        for case in [Case::Direct, Case::Nginx, Case::Gateway] {
            check_interrupted()?;
            let measured = match case {
                Case::Direct => measure(&backend, &backend, placement, case, &load_cpus),
                Case::Nginx | Case::Gateway => start_proxy(
                    case,
                    placement,
                    machine.cores,
                    &scratch,
                    &gateway,
                    backend_address,
                )
                .and_then(|mut proxy| {
                    proxy.wait_ready(|port| expect_body(port, &body))?;
                    measure(&proxy, &backend, placement, case, &load_cpus)
                }),
            };
            match measured {
                Ok(measured) => rows.extend(measured),
                Err(error) => {
                    check_interrupted()?;
                    println!("{} ({}) failed: {error:#}", case.name(), placement.name());
                    failures.push(format!("{} ({}): {error:#}", case.name(), placement.name()));
                }
            }
        }
    }
    drop(scratch);

    let table = table(&rows);
    report(root, record, &table, &failures, || {
        section(&machine, background, &table, &rows)
    })
}

/// The backend's response body: 100 bytes, newline included.
fn backend_body() -> String {
    let mut body = "ployz gateway bench ".repeat(5);
    body.truncate(99);
    body.push('\n');
    body
}

/// The nginx `server` block of the backend: a fixed body from memory.
fn backend_server(port: u16, body: &str) -> String {
    format!(
        "server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   default_type text/plain;\n\
         \x20   location / {{ return 200 \"{}\"; }}\n\
         }}\n",
        body.replace('\n', "\\n")
    )
}

/// The nginx `upstream` and `server` blocks of the reference proxy.
fn proxy_server(port: u16, backend: SocketAddr) -> String {
    format!(
        "upstream backend {{\n\
         \x20   server {backend};\n\
         \x20   keepalive 64;\n\
         }}\n\
         server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   location / {{\n\
         \x20       proxy_pass http://backend;\n\
         \x20       proxy_http_version 1.1;\n\
         \x20       proxy_set_header Connection \"\";\n\
         \x20   }}\n\
         }}\n"
    )
}

/// Starts a foreground nginx named `name` whose `http` block holds `server(port)`.
fn start_nginx(
    scratch: &Scratch,
    name: &str,
    workers: usize,
    cpus: &Cpus,
    server: impl FnOnce(u16) -> String,
) -> Result<Server> {
    let port = free_port()?;
    let prefix = scratch.path().join(name);
    std::fs::create_dir_all(&prefix)
        .with_context(|| format!("cannot create {}", prefix.display()))?;
    let dir = prefix.display();
    // Temp paths are set because Debian's defaults (/var/lib/nginx) may not exist.
    // keepalive_requests is high so that no side closes connections mid-run.
    let conf = format!(
        "worker_processes {workers};\n\
         worker_rlimit_nofile 65536;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{ worker_connections {WORKER_CONNECTIONS}; }}\n\
         http {{\n\
         access_log off;\n\
         keepalive_requests 1000000;\n\
         client_body_temp_path {dir}/body;\n\
         proxy_temp_path {dir}/proxy;\n\
         fastcgi_temp_path {dir}/fastcgi;\n\
         uwsgi_temp_path {dir}/uwsgi;\n\
         scgi_temp_path {dir}/scgi;\n\
         {}\
         }}\n",
        server(port)
    );
    let conf_path = scratch.write(&format!("{name}.conf"), &conf)?;
    let mut command = Command::new("nginx");
    command
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"]);
    Server::start(
        name,
        &mut command,
        cpus,
        scratch.path().join(format!("{name}.log")),
        port,
    )
}

/// Starts the proxy of `case` in front of `backend`, placed as `placement` says.
fn start_proxy(
    case: Case,
    placement: Placement,
    cores: usize,
    scratch: &Scratch,
    gateway: &Path,
    backend: SocketAddr,
) -> Result<Server> {
    let cpus = placement.server_cpus(cores);
    let workers = placement.server_workers(cores);
    let name = format!("{}-{}", case.name().replace(' ', "-"), placement.name());
    match case {
        Case::Nginx => start_nginx(scratch, &name, workers, &cpus, |port| {
            proxy_server(port, backend)
        }),
        Case::Gateway => {
            let port = free_port()?;
            let state_dir = scratch.path().join(format!("{name}-state"));
            source::save_last_good(&state_dir, &routing_table(backend))
                .context("cannot write the gateway's routing table")?;
            let gateway_config = config::GatewayConfig {
                source: config::SourceConfig {
                    nats_url: None,
                    credentials: None,
                    jetstream_domain: None,
                    bucket: "ployz".to_owned(),
                    state_dir,
                    admin_socket: scratch.path().join(format!("{name}.sock")),
                },
                http_listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
                https_listen: Vec::new(),
                tcp_listen_ip: Ipv4Addr::LOCALHOST.into(),
            };
            let config_path =
                scratch.write(&format!("{name}.toml"), &config::render(&gateway_config))?;
            let mut command = Command::new(gateway);
            command
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", "warn")
                // The tokio runtime's worker count, matched to nginx's worker_processes.
                .env("TOKIO_WORKER_THREADS", workers.to_string());
            Server::start(
                &name,
                &mut command,
                &cpus,
                scratch.path().join(format!("{name}.log")),
                port,
            )
        }
        Case::Direct => bail!("the backend is not a proxy"),
    }
}

/// Namespace `bench`: Host `bench.test`, every path, to `backend`.
fn routing_table(backend: SocketAddr) -> RoutingTable {
    let namespace = NamespaceTable {
        seq: 1,
        committed_at_unix_ms: 0,
        services: Default::default(),
        http: vec![HttpRoute {
            service: "web".to_owned(),
            hosts: vec![HOST.to_owned()],
            paths: vec!["/".to_owned()],
            tls: None,
            upstreams: vec![backend],
        }],
        tcp: Vec::new(),
    };
    RoutingTable {
        namespaces: [("bench".to_owned(), namespace)].into(),
    }
}

/// One `GET /` with `Host: bench.test` must answer 200 with `body`.
fn expect_body(port: u16, body: &str) -> Result<()> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let status = response.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "answered `{status}`"
    );
    ensure!(
        response.ends_with(body),
        "answered 200 without the backend's body:\n{response}"
    );
    Ok(())
}

/// Warms up, then runs wrk once per connection count against `server`, which
/// is `backend` itself or a proxy in front of it.
fn measure(
    server: &Server,
    backend: &Server,
    placement: Placement,
    case: Case,
    load_cpus: &Cpus,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for connections in CONNECTIONS {
        wrk(server.port, connections, WARM_UP_SECONDS, load_cpus)?;
        let machine_meter = MachineMeter::start()?;
        let server_meter = server.cpu_meter();
        let backend_meter = backend.cpu_meter();
        let load = wrk(server.port, connections, SECONDS, load_cpus)?;
        let server_cpu_percent = server_meter.percent();
        let backend_cpu_percent = backend_meter.percent();
        let ours = match case {
            Case::Direct => server_cpu_percent + load.cpu_percent,
            Case::Nginx | Case::Gateway => {
                server_cpu_percent + backend_cpu_percent + load.cpu_percent
            }
        };
        let other_cpu_percent = (machine_meter.percent()? - ours).max(0.0);
        let figures = parse_wrk(&load.output)?;
        println!(
            "{} ({}), {connections} connections: {:.0} req/s, p99 {:.2} ms, {} errors, \
             CPU: server {server_cpu_percent:.0}%, backend {backend_cpu_percent:.0}%, \
             wrk {:.0}%, others {other_cpu_percent:.0}%",
            case.name(),
            placement.name(),
            figures.requests_per_second,
            figures.p99_ms,
            figures.errors,
            load.cpu_percent,
        );
        rows.push(Row {
            placement,
            case,
            connections,
            figures,
            server_cpu_percent,
            backend_cpu_percent,
            load_cpu_percent: load.cpu_percent,
            other_cpu_percent,
        });
        warn_if_busy(other_cpu_percent);
    }
    Ok(rows)
}

fn wrk(port: u16, connections: u32, seconds: u32, cpus: &Cpus) -> Result<Load> {
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--latency", "-H"])
        .arg(format!("Host: {HOST}"))
        .arg(format!("http://127.0.0.1:{port}/"));
    run_load(&mut command, cpus)
}

/// What one wrk run reports.
#[derive(Debug, PartialEq)]
struct WrkFigures {
    requests_per_second: f64,
    p99_ms: f64,
    /// Non-2xx/3xx responses plus socket errors: a proxy that fails fast is not fast.
    errors: u64,
}

fn parse_wrk(text: &str) -> Result<WrkFigures> {
    let value_after = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_second = value_after("Requests/sec:")
        .with_context(|| format!("wrk printed no Requests/sec:\n{text}"))?
        .parse()
        .context("Requests/sec is not a number")?;
    let p99 = value_after("99%")
        .with_context(|| format!("wrk printed no 99% latency (--latency):\n{text}"))?;
    let p99_ms = parse_duration_ms(p99)?;
    let mut errors = 0;
    if let Some(count) = value_after("Non-2xx or 3xx responses:") {
        errors += count.parse::<u64>().context("bad non-2xx count")?;
    }
    if let Some(sockets) = value_after("Socket errors:") {
        for part in sockets.split(',') {
            let count = part.split_whitespace().last().unwrap_or_default();
            errors += count.parse::<u64>().context("bad socket error count")?;
        }
    }
    Ok(WrkFigures {
        requests_per_second,
        p99_ms,
        errors,
    })
}

/// wrk's durations: `870.00us`, `1.70ms`, `2.01s`, `1.00m`.
fn parse_duration_ms(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("duration `{text}` has no unit"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("duration `{text}` is not a number"))?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        _ => bail!("duration `{text}` has an unknown unit"),
    };
    Ok(number * factor)
}

/// A Markdown table; the ratio compares each row with nginx at the same placement
/// and connection count.
fn table(rows: &[Row]) -> String {
    let mut table = String::from(
        "| placement | server | connections | req/s | p99 ms | errors | server CPU % | server CPU µs/req | backend CPU % | wrk CPU % | other CPU % | vs nginx |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let nginx = rows
            .iter()
            .find(|other| {
                other.case == Case::Nginx
                    && other.placement == row.placement
                    && other.connections == row.connections
            })
            .map(|nginx| nginx.figures.requests_per_second);
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.0} | {:.2} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
            row.placement.name(),
            row.case.name(),
            row.connections,
            row.figures.requests_per_second,
            row.figures.p99_ms,
            row.figures.errors,
            row.server_cpu_percent,
            cpu_micros_per_request(row.server_cpu_percent, row.figures.requests_per_second),
            row.backend_cpu_percent,
            row.load_cpu_percent,
            row.other_cpu_percent,
            ratio(row.figures.requests_per_second, nginx),
        );
    }
    table
}

/// The recorded section: setup, table and a one-line reading of it.
fn section(machine: &Machine, background: f64, table: &str, rows: &[Row]) -> String {
    let cores = machine.cores;
    // ployz-gateway against nginx at the same placement and connection count.
    let pairs: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter(|row| row.case == Case::Gateway)
        .filter_map(|row| {
            let nginx = rows.iter().find(|other| {
                other.case == Case::Nginx
                    && other.placement == row.placement
                    && other.connections == row.connections
            })?;
            let micros = |row: &Row| {
                cpu_micros_per_request(row.server_cpu_percent, row.figures.requests_per_second)
            };
            Some((
                row.figures.requests_per_second / nginx.figures.requests_per_second,
                micros(row) / micros(nginx),
                row.figures.p99_ms / nginx.figures.p99_ms,
            ))
        })
        .collect();
    let rates: Vec<f64> = pairs.iter().map(|pair| pair.0).collect();
    let cpu: Vec<f64> = pairs.iter().map(|pair| pair.1).collect();
    let p99: Vec<f64> = pairs.iter().map(|pair| pair.2).collect();
    format!(
        "## gateway, {date}\n\n\
         Command: `{COMMAND}`. Machine: {machine}; other processes kept {background:.0}% of \
         a core busy just before the run. \
         `wrk -t{WRK_THREADS} -c<N> -d{SECONDS}s --latency -H 'Host: {HOST}'` after a \
         {WARM_UP_SECONDS} s warm-up, against one nginx backend (`worker_processes 1`, \
         `return 200` with a 100-byte body). Reference: nginx `proxy_pass` with \
         `proxy_http_version 1.1`, `keepalive 64` upstream connections and \
         `Connection \"\"`; at 256 connections more requests are in flight than it keeps \
         idle backend connections, so it also opens and closes some. *pinned*: the proxy \
         alone on CPU {last} with one worker (nginx `worker_processes 1`, gateway \
         `TOKIO_WORKER_THREADS=1`), wrk and the backend on the other CPU(s). *shared*: \
         nothing pinned, nginx `worker_processes {cores}`, gateway {cores} tokio workers. \
         Server CPU is the proxy's (the backend's for *backend direct*), 100 = one core; \
         when wrk plus the backend fill the CPU(s) they have, the load side, not the \
         proxy, bounds the rate, and server CPU µs/req is then the fairer comparison. \
         Other CPU is the machine's CPU outside these processes during the run \
         (the kernel's loopback work included).\n\n{table}\n\
         ployz-gateway against nginx, over these {runs} runs: {rates} the requests per \
         second, {cpu} the proxy CPU per request, {p99} the p99 latency; {busy} of \
         {all} runs had other CPU over {OTHER_CPU_WARNING_PERCENT:.0}% (other work on the \
         machine: those figures are skewed).\n",
        date = machine.date,
        machine = machine.describe(),
        last = cores.saturating_sub(1),
        runs = pairs.len(),
        busy = rows
            .iter()
            .filter(|row| row.other_cpu_percent > OTHER_CPU_WARNING_PERCENT)
            .count(),
        all = rows.len(),
        rates = span(&rates),
        cpu = span(&cpu),
        p99 = span(&p99),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "Running 5s test @ http://127.0.0.1:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   636.48us  301.16us   9.83ms   87.91%
    Req/Sec    50.17k     3.68k   57.04k    73.00%
  Latency Distribution
     50%  587.00us
     75%  741.00us
     90%  0.92ms
     99%    1.70ms
  498958 requests in 5.00s, 118.49MB read
  Non-2xx or 3xx responses: 12
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  99784.43
Transfer/sec:     23.70MB
";

    #[test]
    fn parses_wrk_rate_p99_and_errors() {
        let figures = parse_wrk(WRK_OUTPUT).expect("a valid wrk report");
        assert_eq!(
            figures,
            WrkFigures {
                requests_per_second: 99784.43,
                p99_ms: 1.70,
                errors: 16,
            }
        );
        assert!(parse_wrk("unable to connect").is_err());
    }

    #[test]
    fn parses_wrk_durations() {
        assert!((parse_duration_ms("870.00us").expect("us") - 0.87).abs() < 1e-9);
        assert!((parse_duration_ms("2.01s").expect("s") - 2010.0).abs() < 1e-9);
        assert!(parse_duration_ms("3.0h").is_err());
    }

    #[test]
    fn section_compares_the_gateway_with_nginx_at_the_same_load() {
        let row = |case, connections, requests_per_second, server_cpu_percent| Row {
            placement: Placement::Shared,
            case,
            connections,
            figures: WrkFigures {
                requests_per_second,
                p99_ms: 2.0,
                errors: 0,
            },
            server_cpu_percent,
            backend_cpu_percent: 50.0,
            load_cpu_percent: 50.0,
            other_cpu_percent: 30.0,
        };
        let rows = [
            row(Case::Nginx, 64, 20_000.0, 50.0),
            row(Case::Gateway, 64, 10_000.0, 50.0),
            row(Case::Nginx, 256, 10_000.0, 50.0),
            row(Case::Gateway, 256, 10_000.0, 50.0),
        ];
        let machine = Machine {
            date: "today".to_owned(),
            cores: 2,
            kernel: "6".to_owned(),
            cpu: "x".to_owned(),
        };
        let text = section(&machine, 3.0, &table(&rows), &rows);
        assert!(text.starts_with("## gateway, today\n"));
        assert!(text.contains("over these 2 runs: 0.50–1.00× the requests per second"));
        assert!(text.contains("1.00–2.00× the proxy CPU per request"));
        assert!(text.contains(
            "| shared | ployz-gateway | 64 | 10000 | 2.00 | 0 | 50 | 50.0 | 50 | 50 | 30 | 0.50 |"
        ));
    }

    #[test]
    fn backend_body_is_100_bytes() {
        assert_eq!(backend_body().len(), 100);
    }
}
