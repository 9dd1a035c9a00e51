//! Freeze cost against the number of frozen connections, beside the cost of CRIU's two network
//! locks for the same connections, all measured in one run in a test-bed namespace.
//!
//! The tcpmig numbers are the map updates themselves (what a migration pays): the service freeze
//! is one update whatever the number of connections, the 4-tuple freeze one batch of N. The
//! tuples are synthetic (the map does not care whether sockets exist; the integration tests show
//! that real connections are frozen). CRIU's default lock is reproduced exactly: two
//! `sh -c 'iptables -w ... -j DROP'` spawns per connection; past 1,000 connections it is
//! extrapolated from 40 spawns timed with half the rules already in the table (the per-rule cost
//! grows with the table, so this is the mean for a linear growth).
use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tcpmig::{
    freeze::{Freeze, RemoveOnDrop},
    net::Netns,
    tuple::Tuple,
};
use tcpmig_testbed::{Host, IFACE, SERVICE_V4, TestBed};

use crate::report::{Stats, measure};

const SERVICE_PORT: u16 = 8080;
const TTL: Duration = Duration::from_secs(60);
/// Iptables spawns timed one by one up to this many rules; past it, extrapolated.
const IPTABLES_MEASURED_RULES: usize = 2_000;
const IPTABLES_SAMPLE: usize = 40;

#[derive(Serialize)]
pub struct FreezeResult {
    pub connections: usize,
    pub service_freeze: Stats,
    pub service_unfreeze: Stats,
    pub tuples_freeze: Stats,
    pub tuples_unfreeze: Stats,
    pub criu_iptables_lock: IptablesLock,
    pub nft_set_lock: Stats,
    pub nft_set_unlock: Stats,
}

#[derive(Serialize)]
pub struct IptablesLock {
    pub rules: usize,
    pub seconds: f64,
    pub per_rule_ms: f64,
    pub extrapolated: bool,
}

pub fn run(ns: &[usize]) -> anyhow::Result<Vec<FreezeResult>> {
    let bed = TestBed::new()?;
    let netns = Netns::open(bed.source().name())?;
    let name = format!("{}-bench", bed.prefix());
    let mut freeze = RemoveOnDrop::new(Freeze::attach(&netns, IFACE, &name)?);
    let service = SocketAddr::new(SERVICE_V4.into(), SERVICE_PORT);
    ns.iter()
        .map(|&n| {
            eprintln!("freeze bench: {n} connections");
            let tuples = synthetic_tuples(service, n);
            let result = FreezeResult {
                connections: n,
                service_freeze: measure(1_000, || {
                    let started = Instant::now();
                    freeze.freeze_services(&[service], TTL)?;
                    let took = started.elapsed();
                    freeze.thaw_services(&[service])?;
                    Ok(took)
                })?,
                service_unfreeze: measure(1_000, || {
                    freeze.freeze_services(&[service], TTL)?;
                    let started = Instant::now();
                    freeze.thaw_services(&[service])?;
                    Ok(started.elapsed())
                })?,
                tuples_freeze: measure(5, || {
                    let started = Instant::now();
                    freeze.freeze_tuples(&tuples, TTL)?;
                    let took = started.elapsed();
                    freeze.thaw_tuples(&tuples)?;
                    Ok(took)
                })?,
                tuples_unfreeze: measure(5, || {
                    freeze.freeze_tuples(&tuples, TTL)?;
                    let started = Instant::now();
                    freeze.thaw_tuples(&tuples)?;
                    Ok(started.elapsed())
                })?,
                criu_iptables_lock: criu_iptables_lock(bed.source(), &tuples)?,
                nft_set_lock: nft_set_lock(bed.source(), &tuples, true)?,
                nft_set_unlock: nft_set_lock(bed.source(), &tuples, false)?,
            };
            Ok(result)
        })
        .collect()
}

/// `n` distinct client connections to `service`, 60,000 ports per client address.
fn synthetic_tuples(service: SocketAddr, n: usize) -> Vec<Tuple> {
    (0..n)
        .map(|i| {
            let host = u32::try_from(i / 60_000).expect("fewer than 2^32 hosts");
            let remote_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 1)) + host);
            let port = 1024 + u16::try_from(i % 60_000).expect("fits");
            Tuple {
                local: service,
                remote: SocketAddr::new(remote_ip.into(), port),
            }
        })
        .collect()
}

/// CRIU's two rules for one connection (criu/netfilter.c): one per direction, letting its own
/// marked packets through.
fn criu_rules(tuple: &Tuple) -> [String; 2] {
    let rule = |chain: &str, src: SocketAddr, dst: SocketAddr| {
        format!(
            "-I {chain} --protocol tcp -m mark ! --mark 0xC114 --source {} --sport {} \
             --destination {} --dport {} -j DROP",
            src.ip(),
            src.port(),
            dst.ip(),
            dst.port()
        )
    };
    [
        rule("INPUT", tuple.remote, tuple.local),
        rule("OUTPUT", tuple.local, tuple.remote),
    ]
}

fn sh(host: &Host, script: &str, stdin: Option<&str>) -> anyhow::Result<()> {
    let mut cmd = host.command("sh")?;
    cmd.args(["-c", script])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning sh -c {script:?}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "sh -c {script:?} in {}: {}",
            host.name(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn criu_iptables_lock(host: &Host, tuples: &[Tuple]) -> anyhow::Result<IptablesLock> {
    let rules: Vec<String> = tuples.iter().flat_map(criu_rules).collect();
    let spawn_rule = |rule: &str| sh(host, &format!("iptables -w -t filter {rule}"), None);
    let result = if rules.len() <= IPTABLES_MEASURED_RULES {
        let started = Instant::now();
        for rule in &rules {
            spawn_rule(rule)?;
        }
        let seconds = started.elapsed().as_secs_f64();
        IptablesLock {
            rules: rules.len(),
            seconds,
            per_rule_ms: seconds * 1e3 / rules.len() as f64,
            extrapolated: false,
        }
    } else {
        let half = rules.len() / 2;
        let mut restore = String::from("*filter\n");
        for rule in &rules[..half] {
            writeln!(restore, "{}", rule.replacen("-I ", "-A ", 1))?;
        }
        restore.push_str("COMMIT\n");
        sh(host, "iptables-restore --noflush", Some(&restore))?;
        let started = Instant::now();
        for rule in &rules[half..half + IPTABLES_SAMPLE] {
            spawn_rule(rule)?;
        }
        let per_rule = started.elapsed().as_secs_f64() / IPTABLES_SAMPLE as f64;
        IptablesLock {
            rules: rules.len(),
            seconds: per_rule * rules.len() as f64,
            per_rule_ms: per_rule * 1e3,
            extrapolated: true,
        }
    };
    sh(host, "iptables -F INPUT && iptables -F OUTPUT", None)?;
    Ok(result)
}

/// One nft transaction that creates a table with a set of all the connections and a rule
/// dropping them (`lock`), or deletes that table (`!lock`); timed around the `nft` process.
fn nft_set_lock(host: &Host, tuples: &[Tuple], lock: bool) -> anyhow::Result<Stats> {
    let mut script = String::from(
        "table inet tcpmig_bench {\n set conns4 {\n  type ipv4_addr . inet_service . ipv4_addr . inet_service\n",
    );
    script.push_str("  elements = {\n");
    for (i, tuple) in tuples.iter().enumerate() {
        let sep = if i + 1 == tuples.len() { "" } else { "," };
        writeln!(
            script,
            "   {} . {} . {} . {}{sep}",
            tuple.remote.ip(),
            tuple.remote.port(),
            tuple.local.ip(),
            tuple.local.port()
        )?;
    }
    script.push_str(
        "  }\n }\n chain input {\n  type filter hook input priority 0;\n  \
         ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop\n }\n}\n",
    );
    let create = || sh(host, "nft -f -", Some(&script));
    let delete = || sh(host, "nft delete table inet tcpmig_bench", None);
    measure(3, || {
        let started = Instant::now();
        if lock {
            create()?;
            let took = started.elapsed();
            delete()?;
            Ok(took)
        } else {
            create()?;
            let started = Instant::now();
            delete()?;
            Ok(started.elapsed())
        }
    })
}

pub fn markdown(results: &[FreezeResult]) -> String {
    let mut md = String::from(
        "### Freeze cost against connection count (medians, microseconds unless marked)\n\n\
         | N | service freeze | service unfreeze | 4-tuple batch freeze | 4-tuple unfreeze | \
         CRIU iptables lock (s) | nft set lock (s) | iptables / service freeze |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let iptables = &r.criu_iptables_lock;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2}{} | {:.3} | {:.0}x |",
            r.connections,
            r.service_freeze.median_us,
            r.service_unfreeze.median_us,
            r.tuples_freeze.median_us,
            r.tuples_unfreeze.median_us,
            iptables.seconds,
            if iptables.extrapolated {
                " (extrapolated)"
            } else {
                ""
            },
            r.nft_set_lock.median_us / 1e6,
            iptables.seconds * 1e6 / r.service_freeze.median_us,
        );
    }
    md.push_str(
        "\nService freeze: one map update, whatever N. 4-tuple freeze: one BPF_MAP_UPDATE_BATCH \
         of N entries. CRIU iptables lock: two `sh -c iptables` spawns per connection, as CRIU's \
         default lock does; nft: one table with a set of N elements, in one transaction.\n",
    );
    md
}
