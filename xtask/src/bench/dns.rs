//! `cargo xtask bench dns`: queries per second and latency with dnsperf against
//! knot (the reference, an authoritative server) and `ployz-dns`, both serving
//! the same 100 A records `svc<K>.bench.ployz.internal`. Needs knot, dnsperf
//! and dig.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use ployz_routing::{Instance, NamespaceTable, RoutingTable, ServiceEntry, config, source};

use super::{
    Cpus, Load, Machine, MachineMeter, OTHER_CPU_WARNING_PERCENT, Placement, Scratch, Server,
    background_cpu_percent, build_release, check_interrupted, cpu_micros_per_request, ensure_tools,
    free_port, output, ratio, report, run_load, span, stop_on_signals, warn_if_busy,
};
use crate::step;

/// The command line that reproduces a run, written next to its figures.
const COMMAND: &str = "cargo xtask bench --record dns";
const SERVICES: u32 = 100;
const NAMESPACE: &str = "bench";
const SECONDS: u32 = 5;
const WARM_UP_SECONDS: u32 = 1;
const CLIENTS: u32 = 4;
/// The name checked with dig before measuring, and its address.
const PROBE_SERVICE: u32 = 7;

/// The servers compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Knot,
    PloyzDns,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Self::Knot => "knot",
            Self::PloyzDns => "ployz-dns",
        }
    }
}

/// One dnsperf run.
struct Row {
    placement: Placement,
    case: Case,
    figures: DnsperfFigures,
    server_cpu_percent: f64,
    load_cpu_percent: f64,
    /// Machine CPU outside server and dnsperf, loopback softirq work included.
    other_cpu_percent: f64,
}

/// Runs the DNS benchmark; with `record`, appends its figures to docs/benchmarks.md.
pub(super) fn run(root: &Path, record: bool) -> Result<()> {
    ensure_tools(&[
        ("knotd", "knot"),
        ("dnsperf", "dnsperf"),
        ("dig", "dnsutils"),
    ])?;
    stop_on_signals();
    let ployz_dns = build_release(root, "ployz-dns")?;
    let machine = Machine::probe()?;
    let scratch = Scratch::create("dns")?;
    let background = background_cpu_percent()?;
    scratch.write("ployz.internal.zone", &zone_file())?;
    let queries = scratch.write("queries.txt", &query_file())?;
    let expected = service_address(PROBE_SERVICE).to_string();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for placement in Placement::all(machine.cores) {
        let load_cpus = placement.load_cpus(machine.cores);
        let dnsperf = Dnsperf {
            queries: queries.clone(),
            threads: load_cpus.count(machine.cores),
            cpus: load_cpus,
        };
        step(&format!(
            "{}: dnsperf ({} thread(s)) on {}, server on {} with {} worker(s)",
            placement.name(),
            dnsperf.threads,
            dnsperf.cpus.describe(),
            placement.server_cpus(machine.cores).describe(),
            placement.server_workers(machine.cores),
        ));
        for case in [Case::Knot, Case::PloyzDns] {
            check_interrupted()?;
            let measured = start_server(case, placement, machine.cores, &scratch, &ployz_dns)
                .and_then(|mut server| {
                    server.wait_ready(|port| expect_answer(port, &expected))?;
                    measure(&server, placement, case, &dnsperf)
                });
            match measured {
                Ok(row) => rows.push(row),
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

/// The address of `svc<index>`: 10.0.0.1 onwards.
fn service_address(index: u32) -> Ipv4Addr {
    let host = index + 1;
    Ipv4Addr::new(10, 0, (host / 250) as u8, (host % 250) as u8)
}

/// Knot's zone: the same A records as ployz-dns's table, with a short TTL as a
/// service discovery answer has.
fn zone_file() -> String {
    let mut zone = String::from(
        "$ORIGIN ployz.internal.\n\
         $TTL 5\n\
         @ SOA ns hostmaster 1 3600 600 86400 5\n\
         @ NS ns\n\
         ns A 127.0.0.1\n",
    );
    for index in 0..SERVICES {
        let _ = writeln!(zone, "svc{index}.{NAMESPACE} A {}", service_address(index));
    }
    zone
}

/// dnsperf's input, cycling through every service.
fn query_file() -> String {
    (0..SERVICES)
        .map(|index| format!("svc{index}.{NAMESPACE}.ployz.internal A\n"))
        .collect()
}

/// Namespace `bench` with services `svc0..svc99`, one instance each.
fn routing_table() -> RoutingTable {
    let services = (0..SERVICES)
        .map(|index| {
            let entry = ServiceEntry {
                ports: vec![8080],
                instances: vec![Instance {
                    replica: 0,
                    machine: "m1".to_owned(),
                    addresses: vec![IpAddr::V4(service_address(index))],
                }],
            };
            (format!("svc{index}"), entry)
        })
        .collect();
    let namespace = NamespaceTable {
        seq: 1,
        committed_at_unix_ms: 0,
        services,
        http: Vec::new(),
        tcp: Vec::new(),
    };
    RoutingTable {
        namespaces: [(NAMESPACE.to_owned(), namespace)].into(),
    }
}

/// Starts the server of `case`, placed as `placement` says.
fn start_server(
    case: Case,
    placement: Placement,
    cores: usize,
    scratch: &Scratch,
    ployz_dns: &Path,
) -> Result<Server> {
    let cpus = placement.server_cpus(cores);
    let workers = placement.server_workers(cores);
    let name = format!("{}-{}", case.name(), placement.name());
    let port = free_port()?;
    let log = scratch.path().join(format!("{name}.log"));
    let mut command = match case {
        Case::Knot => {
            let dir = scratch.path().display();
            // One TCP and one background worker: dnsperf speaks UDP only.
            let conf = format!(
                "server:\n\
                 \x20   rundir: \"{dir}/{name}-run\"\n\
                 \x20   listen: 127.0.0.1@{port}\n\
                 \x20   udp-workers: {workers}\n\
                 \x20   tcp-workers: 1\n\
                 \x20   background-workers: 1\n\
                 database:\n\
                 \x20   storage: \"{dir}/{name}-db\"\n\
                 log:\n\
                 \x20 - target: stderr\n\
                 \x20   any: warning\n\
                 zone:\n\
                 \x20 - domain: ployz.internal.\n\
                 \x20   storage: \"{dir}\"\n\
                 \x20   file: ployz.internal.zone\n\
                 \x20   journal-content: none\n\
                 \x20   zonefile-sync: -1\n"
            );
            std::fs::create_dir_all(scratch.path().join(format!("{name}-run")))?;
            let conf_path = scratch.write(&format!("{name}.conf"), &conf)?;
            let mut command = Command::new("knotd");
            command.arg("-c").arg(conf_path);
            command
        }
        Case::PloyzDns => {
            let state_dir = scratch.path().join(format!("{name}-state"));
            source::save_last_good(&state_dir, &routing_table())
                .context("cannot write ployz-dns's routing table")?;
            let dns_config = config::DnsConfig {
                source: config::SourceConfig {
                    nats_url: None,
                    credentials: None,
                    jetstream_domain: None,
                    bucket: "ployz".to_owned(),
                    state_dir,
                    admin_socket: scratch.path().join(format!("{name}.sock")),
                },
                listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
                // Discard: never asked, every query is inside ployz.internal.
                upstreams: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 9))],
                resolv_conf: "/etc/resolv.conf".into(),
            };
            let config_path =
                scratch.write(&format!("{name}.toml"), &config::render(&dns_config))?;
            let mut command = Command::new(ployz_dns);
            command
                .arg("--config")
                .arg(config_path)
                .env("RUST_LOG", "warn")
                // The tokio runtime's worker count, matched to knot's udp-workers.
                .env("TOKIO_WORKER_THREADS", workers.to_string());
            command
        }
    };
    Server::start(&name, &mut command, &cpus, log, port)
}

/// `dig` must get `expected` as the only A record of the probe service.
fn expect_answer(port: u16, expected: &str) -> Result<()> {
    let name = format!("svc{PROBE_SERVICE}.{NAMESPACE}.ployz.internal");
    let answer = output(
        "dig",
        &[
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+short",
            "+time=1",
            "+tries=1",
            &name,
            "A",
        ],
    )?;
    ensure!(
        answer.trim() == expected,
        "`dig {name} A` answered `{}`, expected `{expected}`",
        answer.trim()
    );
    Ok(())
}

/// Warms up, then runs dnsperf once against `server`.
fn measure(server: &Server, placement: Placement, case: Case, load: &Dnsperf) -> Result<Row> {
    load.run(server.port, WARM_UP_SECONDS)?;
    let machine_meter = MachineMeter::start()?;
    let meter = server.cpu_meter();
    let load = load.run(server.port, SECONDS)?;
    let server_cpu_percent = meter.percent();
    let other_cpu_percent =
        (machine_meter.percent()? - server_cpu_percent - load.cpu_percent).max(0.0);
    let figures = parse_dnsperf(&load.output)?;
    warn_if_busy(other_cpu_percent);
    println!(
        "{} ({}): {:.0} queries/s, avg {:.3} ms (max {:.3}, stddev {:.3}), {:.2}% lost, \
         {:.2}% NOERROR, server CPU {server_cpu_percent:.0}%, dnsperf CPU {:.0}%, others \
         {other_cpu_percent:.0}%",
        case.name(),
        placement.name(),
        figures.queries_per_second,
        figures.average_ms,
        figures.max_ms,
        figures.stddev_ms,
        figures.lost_percent,
        figures.noerror_percent,
        load.cpu_percent,
    );
    Ok(Row {
        placement,
        case,
        figures,
        server_cpu_percent,
        load_cpu_percent: load.cpu_percent,
        other_cpu_percent,
    })
}

/// How dnsperf runs: its query file, its CPUs and its thread count.
struct Dnsperf {
    queries: PathBuf,
    cpus: Cpus,
    threads: usize,
}

impl Dnsperf {
    fn run(&self, port: u16, seconds: u32) -> Result<Load> {
        let mut command = Command::new("dnsperf");
        // No -Q: dnsperf sends as fast as answers come back, 100 queries
        // outstanding. One thread per CPU it may use: one thread alone leaves both
        // dnsperf and the server partly idle, waiting on each other's wake-ups.
        command
            .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
            .arg(&self.queries)
            .args(["-l", &seconds.to_string(), "-c", &CLIENTS.to_string()])
            .args(["-T", &self.threads.to_string()]);
        run_load(&mut command, &self.cpus)
    }
}

/// What one dnsperf run reports.
#[derive(Debug, PartialEq)]
struct DnsperfFigures {
    queries_per_second: f64,
    average_ms: f64,
    max_ms: f64,
    stddev_ms: f64,
    lost_percent: f64,
    /// Share of completed queries answered NOERROR: a server failing fast is not fast.
    noerror_percent: f64,
}

fn parse_dnsperf(text: &str) -> Result<DnsperfFigures> {
    let value_after = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("dnsperf printed no `{prefix}`:\n{text}"))
    };
    let number = |text: &str| -> Result<f64> {
        text.trim()
            .trim_start_matches('(')
            .trim_end_matches([')', '%'])
            .parse()
            .with_context(|| format!("`{text}` is not a number"))
    };
    let queries_per_second = number(value_after("Queries per second:")?)?;
    // `0.000385 (min 0.000013, max 0.005237)`, in seconds.
    let latency = value_after("Average Latency (s):")?;
    let average_ms = 1000.0 * number(latency.split_whitespace().next().unwrap_or_default())?;
    let max_ms = 1000.0
        * number(
            latency
                .split("max")
                .nth(1)
                .context("dnsperf's latency line lacks a max")?,
        )?;
    let stddev_ms = 1000.0 * number(value_after("Latency StdDev (s):")?)?;
    // `0 (0.00%)`
    let lost = value_after("Queries lost:")?;
    let lost_percent = number(lost.split_whitespace().nth(1).unwrap_or("(0%)"))?;
    // `NOERROR 1262378 (100.00%)`, one entry per code seen, comma separated.
    let codes = value_after("Response codes:")?;
    let noerror_percent = codes
        .split(',')
        .find_map(|code| {
            let mut words = code.split_whitespace();
            (words.next() == Some("NOERROR")).then(|| words.nth(1))?
        })
        .map_or(Ok(0.0), number)?;
    Ok(DnsperfFigures {
        queries_per_second,
        average_ms,
        max_ms,
        stddev_ms,
        lost_percent,
        noerror_percent,
    })
}

/// A Markdown table; the ratio compares each row with knot at the same placement.
fn table(rows: &[Row]) -> String {
    let mut table = String::from(
        "| placement | server | queries/s | avg ms | max ms | stddev ms | lost % | NOERROR % | server CPU % | server CPU µs/query | dnsperf CPU % | other CPU % | vs knot |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let knot = rows
            .iter()
            .find(|other| other.case == Case::Knot && other.placement == row.placement)
            .map(|knot| knot.figures.queries_per_second);
        let figures = &row.figures;
        let _ = writeln!(
            table,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.0} | {:.1} | {:.0} | {:.0} | {} |",
            row.placement.name(),
            row.case.name(),
            figures.queries_per_second,
            figures.average_ms,
            figures.max_ms,
            figures.stddev_ms,
            figures.lost_percent,
            figures.noerror_percent,
            row.server_cpu_percent,
            cpu_micros_per_request(row.server_cpu_percent, figures.queries_per_second),
            row.load_cpu_percent,
            row.other_cpu_percent,
            ratio(figures.queries_per_second, knot),
        );
    }
    table
}

/// The recorded section: setup, table and a one-line reading of it.
fn section(machine: &Machine, background: f64, table: &str, rows: &[Row]) -> String {
    let cores = machine.cores;
    // ployz-dns against knot at the same placement.
    let pairs: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter(|row| row.case == Case::PloyzDns)
        .filter_map(|row| {
            let knot = rows
                .iter()
                .find(|other| other.case == Case::Knot && other.placement == row.placement)?;
            let micros = |row: &Row| {
                cpu_micros_per_request(row.server_cpu_percent, row.figures.queries_per_second)
            };
            Some((
                row.figures.queries_per_second / knot.figures.queries_per_second,
                micros(row) / micros(knot),
                row.figures.average_ms / knot.figures.average_ms,
            ))
        })
        .collect();
    let rates: Vec<f64> = pairs.iter().map(|pair| pair.0).collect();
    let cpu: Vec<f64> = pairs.iter().map(|pair| pair.1).collect();
    let latency: Vec<f64> = pairs.iter().map(|pair| pair.2).collect();
    format!(
        "## dns, {date}\n\n\
         Command: `{COMMAND}`. Machine: {machine}; other processes kept {background:.0}% of \
         a core busy just before the run. \
         `dnsperf -l {SECONDS} -c {CLIENTS} -T <CPUs it may use>` (no `-Q`: unlimited \
         rate, 100 queries outstanding) after a {WARM_UP_SECONDS} s warm-up, cycling `svc<K>.{NAMESPACE}.ployz.internal A` \
         for K in 0..{SERVICES}; both servers answer the same {SERVICES} A records \
         (checked with `dig` first). Reference: knot (authoritative zone file, \
         `udp-workers` as below, 1 TCP and 1 background worker). *pinned*: the \
         server alone on CPU {last} with one worker (knot `udp-workers: 1`, ployz-dns \
         `TOKIO_WORKER_THREADS=1`), dnsperf on the other CPU(s). *shared*: nothing \
         pinned, knot `udp-workers: {cores}`, ployz-dns {cores} tokio workers. Server \
         CPU: 100 = one core; dnsperf CPU near 100 per CPU it has means the load side \
         bounds the rate, and server CPU µs/query is then the fairer comparison. Other \
         CPU is the machine's CPU outside server and dnsperf during the run (the \
         kernel's loopback work included).\n\n{table}\n\
         ployz-dns against knot, over these {runs} runs: {rates} the queries per second, \
         {cpu} the server CPU per query, {latency} the average latency; {busy} of {all} \
         runs had other CPU over {OTHER_CPU_WARNING_PERCENT:.0}% (other work on the \
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
        latency = span(&latency),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DNSPERF_OUTPUT: &str = "Statistics:

  Queries sent:         1262378
  Queries completed:    1262370 (100.00%)
  Queries lost:         8 (0.01%)

  Response codes:       NOERROR 1262000 (99.97%), SERVFAIL 370 (0.03%)
  Average packet size:  request 40, response 56
  Run time (s):         5.001092
  Queries per second:   252420.473249

  Average Latency (s):  0.000385 (min 0.000013, max 0.005237)
  Latency StdDev (s):   0.000211
";

    #[test]
    fn parses_dnsperf_statistics() {
        let figures = parse_dnsperf(DNSPERF_OUTPUT).expect("a valid dnsperf report");
        assert!((figures.queries_per_second - 252_420.473_249).abs() < 1e-6);
        assert!((figures.average_ms - 0.385).abs() < 1e-9);
        assert!((figures.max_ms - 5.237).abs() < 1e-9);
        assert!((figures.stddev_ms - 0.211).abs() < 1e-9);
        assert!((figures.lost_percent - 0.01).abs() < 1e-9);
        assert!((figures.noerror_percent - 99.97).abs() < 1e-9);
        assert!(parse_dnsperf("no statistics").is_err());
    }

    #[test]
    fn zone_and_table_hold_the_same_addresses() {
        let zone = zone_file();
        let table = routing_table();
        let services = &table.namespaces[NAMESPACE].services;
        assert_eq!(services.len(), SERVICES as usize);
        for (name, entry) in services {
            let address = entry.instances[0].addresses[0];
            assert!(zone.contains(&format!("{name}.{NAMESPACE} A {address}\n")));
        }
        assert_eq!(service_address(PROBE_SERVICE), Ipv4Addr::new(10, 0, 0, 8));
    }
}
