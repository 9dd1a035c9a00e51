//! `tcpmig freeze`, `unfreeze`, `status`.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;
use tcpmig::{
    freeze::{self, Freeze, FreezeStatus},
    net::Netns,
};

use super::print_json;

#[derive(Args)]
pub struct NetnsArg {
    /// Network namespace: a name under /run/netns or a path such as /proc/PID/ns/net
    /// [default: this process's].
    #[arg(long, value_name = "NS")]
    netns: Option<String>,
}

impl NetnsArg {
    fn open(&self) -> anyhow::Result<Netns> {
        Ok(match &self.netns {
            Some(spec) => Netns::open(spec)?,
            None => Netns::current()?,
        })
    }
}

#[derive(Args)]
pub struct FreezeArgs {
    #[command(flatten)]
    netns: NetnsArg,
    /// Interface that carries the service's traffic.
    #[arg(long, value_name = "IFACE")]
    dev: String,
    /// Service to freeze (local address and port of its connections); repeatable.
    #[arg(long, value_name = "ADDR:PORT")]
    service: Vec<SocketAddr>,
    /// Also freeze every TCP connection of this process, as 4-tuples (in one batched update),
    /// leaving the other connections of the same ports alone.
    #[arg(long, value_name = "PID")]
    tuples_of_pid: Option<u32>,
    /// Seconds after which traffic passes again by itself, even if nobody unfreezes.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    deadline: f64,
    /// Name of the freeze [default: the namespace's name].
    #[arg(long)]
    name: Option<String>,
    /// Keep the freeze only while this command runs: lift it on Ctrl-C/SIGTERM or at the
    /// deadline (if the command is killed, the deadline still lifts it).
    #[arg(long)]
    hold: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UnfreezeArgs {
    #[command(flatten)]
    netns: NetnsArg,
    /// Name of the freeze [default: the namespace's name].
    #[arg(long, conflicts_with = "all")]
    name: Option<String>,
    /// Remove every freeze in the namespace.
    #[arg(long)]
    all: bool,
    /// Only thaw these services and keep the rest of the freeze; repeatable.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "all")]
    service: Vec<SocketAddr>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Only freezes and steerings in this namespace (name under /run/netns or path).
    #[arg(long, value_name = "NS")]
    netns: Option<String>,
    /// Print the result as JSON: `{"freezes": [...], "steerings": [...]}`.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct FreezeReport<'a> {
    name: &'a str,
    netns: &'a str,
    dev: &'a str,
    services: &'a [SocketAddr],
    /// 4-tuples frozen (--tuples-of-pid).
    tuples: usize,
    deadline_s: f64,
    /// Time to attach (or find attached) the programs.
    attach_us: f64,
    /// Time of the map updates that froze the services and 4-tuples (with --tuples-of-pid,
    /// finding the process's connections too).
    freeze_us: f64,
}

pub fn freeze(args: FreezeArgs) -> anyhow::Result<()> {
    if args.service.is_empty() && args.tuples_of_pid.is_none() {
        bail!("nothing to freeze: give --service ADDR:PORT or --tuples-of-pid PID");
    }
    if !(args.deadline.is_finite() && args.deadline > 0.0) {
        bail!("--deadline must be a positive number of seconds");
    }
    let netns = args.netns.open()?;
    let name = args.name.unwrap_or_else(|| freeze::default_name(&netns));
    let started = std::time::Instant::now();
    let mut handle = freeze::RemoveOnDrop::new(Freeze::attach(&netns, &args.dev, &name)?);
    let attached = started.elapsed();
    let ttl = Duration::from_secs_f64(args.deadline);
    let freeze_started = std::time::Instant::now();
    handle.freeze_services(&args.service, ttl)?;
    let tuples = match args.tuples_of_pid {
        Some(pid) => process_tuples(&netns, pid)?,
        None => Vec::new(),
    };
    handle.freeze_tuples(&tuples, ttl)?;
    let froze = freeze_started.elapsed();
    let report = FreezeReport {
        name: &name,
        netns: netns.spec(),
        dev: &args.dev,
        services: &args.service,
        tuples: tuples.len(),
        deadline_s: args.deadline,
        attach_us: attached.as_secs_f64() * 1e6,
        freeze_us: froze.as_secs_f64() * 1e6,
    };
    if args.json {
        print_json(&report)?;
    } else {
        let mut frozen: Vec<String> = args.service.iter().map(ToString::to_string).collect();
        if let Some(pid) = args.tuples_of_pid {
            frozen.push(format!("{} connection(s) of process {pid}", tuples.len()));
        }
        println!(
            "frozen {} on {} in {} (freeze {}, traffic passes again in {} s unless unfrozen) in {:.1} us",
            frozen.join(", "),
            report.dev,
            report.netns,
            report.name,
            report.deadline_s,
            report.freeze_us
        );
    }
    if args.hold {
        use std::io::Write as _;
        std::io::stdout().flush()?;
        let interrupted = tcpmig::sys::wait_for_termination(ttl)?;
        tracing::info!(interrupted, "lifting the held freeze");
        // Dropping the guard removes the freeze.
    } else {
        handle.keep();
    }
    Ok(())
}

/// The 4-tuples of every TCP connection process `pid` holds in `netns`.
fn process_tuples(netns: &Netns, pid: u32) -> anyhow::Result<Vec<tcpmig::tuple::Tuple>> {
    let found = tcpmig::repair::discover(netns, pid, &tcpmig::repair::Filter::default())
        .with_context(|| format!("finding the connections of process {pid}"))?;
    Ok(found
        .sockets
        .iter()
        .map(|socket| socket.tuple)
        .chain(found.skipped.iter().map(|(tuple, _)| *tuple))
        .collect())
}

pub fn unfreeze(args: UnfreezeArgs) -> anyhow::Result<()> {
    let netns = args.netns.open()?;
    if args.all {
        let removed = freeze::remove_all_in(&netns)?;
        println!("removed {} freeze(s) in {}", removed.len(), netns.spec());
        return Ok(());
    }
    let name = args.name.unwrap_or_else(|| freeze::default_name(&netns));
    if args.service.is_empty() {
        freeze::remove(&name).with_context(|| format!("unfreezing {name}"))?;
        println!("unfrozen {name}: programs detached, pins removed");
    } else {
        Freeze::open(&name)?.thaw_services(&args.service)?;
        println!("thawed {} service(s) of {name}", args.service.len());
    }
    Ok(())
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let netns = args.netns.as_deref().map(Netns::open).transpose()?;
    let statuses = freeze::statuses(netns.as_ref())?;
    let steerings = freeze::steering_statuses(netns.as_ref())?;
    if args.json {
        return print_json(&serde_json::json!({
            "freezes": statuses,
            "steerings": steerings,
        }));
    }
    if statuses.is_empty() {
        println!("no freeze");
    }
    for status in &statuses {
        print_status(status);
    }
    super::steer::print_steerings(&steerings);
    Ok(())
}

fn print_status(status: &FreezeStatus) {
    let info = &status.info;
    println!(
        "freeze {} on {} (ifindex {}) in {} [{:?}]",
        info.name, info.dev, info.ifindex, info.netns, info.attach
    );
    for entry in &status.services {
        if let Some(service) = entry.service {
            let what = if entry.new_connections_only {
                "new connections frozen"
            } else {
                "frozen"
            };
            println!(
                "  service {service}: {what} {:.3} s ago, {}",
                entry.frozen_for_s,
                deadline_text(entry.deadline_in_s)
            );
        }
    }
    println!("  4-tuples frozen: {}", status.tuple_count);
    for entry in &status.tuples {
        if let Some((local, remote)) = entry.tuple {
            println!(
                "    {local} <-> {remote}: {}",
                deadline_text(entry.deadline_in_s)
            );
        }
    }
    let c = &status.counters;
    println!(
        "  dropped: {} SYN, {} ingress, {} egress; passed after deadline: {}; CRIU-marked passed: {}",
        c.syn_dropped,
        c.ingress_dropped,
        c.egress_dropped,
        c.passed_after_deadline,
        c.criu_mark_passed
    );
}

fn deadline_text(deadline_in_s: f64) -> String {
    if deadline_in_s >= 0.0 {
        format!("deadline in {deadline_in_s:.3} s")
    } else {
        format!(
            "deadline passed {:.3} s ago (traffic flows)",
            -deadline_in_s
        )
    }
}
