//! `tcpmig dump` and `tcpmig restore`.
use std::{
    net::SocketAddr,
    os::unix::fs::FileTypeExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use tcpmig::{
    freeze::{self, Freeze, RemoveOnDrop},
    image,
    migrate::{self, Privileged},
    net::Netns,
    repair::{
        self, Connection, Filter, Workers,
        handoff::{self, ExecCommand},
    },
    tuple::Tuple,
};

use super::{handto::HandTo, print_json};

/// How many connections an error lists by name.
const NAMED_IN_ERRORS: usize = 3;

#[derive(Args)]
pub struct DumpArgs {
    /// Process whose connections are dumped.
    #[arg(long)]
    pid: u32,
    /// Only connections on this local port.
    #[arg(long)]
    port: Option<u16>,
    /// Only connections of this service (their local address and port).
    #[arg(long, value_name = "ADDR:PORT")]
    service: Option<SocketAddr>,
    /// Image file to write (mode 0600: it holds the connections' data).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Network namespace of the process's sockets [default: /proc/PID/ns/net].
    #[arg(long, value_name = "NS")]
    netns: Option<String>,
    /// Freeze exactly the dumped connections (their 4-tuples) on this interface first, in a
    /// freeze named dump-PID. Without it the connections must already be frozen
    /// (`tcpmig freeze`), and the dump refuses otherwise.
    #[arg(long, value_name = "IFACE")]
    freeze_dev: Option<String>,
    /// Seconds after which that freeze lets traffic pass again by itself.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30.0,
        requires = "freeze_dev"
    )]
    deadline: f64,
    /// What the source sockets do once the image is written.
    #[arg(long, value_enum, default_value_t = Then::Rollback)]
    then: Then,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Then {
    /// Leave repair mode: the connections carry on here (a checkpoint). A --freeze-dev freeze is
    /// lifted.
    Rollback,
    /// Close the sockets silently (no FIN, no RST): the connections now live in the image only.
    /// Keep the freeze on until they are restored elsewhere, or the peers' next segments are
    /// answered with RSTs here; a --freeze-dev freeze stays pinned until its deadline.
    Commit,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Image written by `tcpmig dump`.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// Network namespace to restore into: a name under /run/netns or a path.
    #[arg(long, value_name = "NS")]
    netns: String,
    #[command(flatten)]
    to: HandTo,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Bytes the connections carry in their queues.
#[derive(Default, serde::Serialize)]
struct Queued {
    /// Sent but unacknowledged, or never sent (`unsent_bytes` of them).
    send_bytes: u64,
    unsent_bytes: u64,
    /// Received and acknowledged but not read by the application.
    recv_bytes: u64,
}

impl Queued {
    fn of(connections: &[Connection]) -> Self {
        connections.iter().fold(Self::default(), |mut q, c| {
            q.send_bytes += c.send_queue.len() as u64;
            q.unsent_bytes += u64::from(c.unsent);
            q.recv_bytes += c.recv_queue.len() as u64;
            q
        })
    }
}

#[derive(serde::Serialize)]
struct DumpReport<'a> {
    pid: u32,
    netns: &'a str,
    image: &'a std::path::Path,
    connections: usize,
    /// Matching connections left out because of their state.
    skipped: usize,
    /// Listening sockets of the process on the filter's port or service.
    listening: &'a [SocketAddr],
    #[serde(flatten)]
    queued: Queued,
    image_bytes: usize,
    then: Then,
    /// The freeze made with --freeze-dev, if any.
    freeze: Option<String>,
    discover_us: f64,
    freeze_us: f64,
    dump_us: f64,
    write_us: f64,
    then_us: f64,
}

pub fn dump(args: DumpArgs) -> anyhow::Result<()> {
    migrate::check_privileges(Privileged::Dump)?;
    if !(args.deadline.is_finite() && args.deadline > 0.0) {
        bail!("--deadline must be a positive number of seconds");
    }
    let netns_spec = args
        .netns
        .clone()
        .unwrap_or_else(|| format!("/proc/{}/ns/net", args.pid));
    let netns = Netns::open(&netns_spec)?;
    let filter = Filter {
        port: args.port,
        service: args.service,
        tuples: Vec::new(),
    };
    let started = Instant::now();
    let discovery = repair::discover(&netns, args.pid, &filter)?;
    let discover_time = started.elapsed();
    if discovery.sockets.is_empty() {
        bail!(
            "process {} has no established connection{} in network namespace {netns_spec}: \
             check --pid, --port, --service and --netns",
            args.pid,
            match (args.service, args.port) {
                (Some(service), _) => format!(" on {service}"),
                (None, Some(port)) => format!(" on port {port}"),
                (None, None) => String::new(),
            }
        );
    }
    let tuples: Vec<Tuple> = discovery.sockets.iter().map(|s| s.tuple).collect();
    let (skipped, listening) = (discovery.skipped.len(), discovery.listening.clone());

    // What needs no freeze is done before it: loading the socket reader, reading the options.
    let port = args.service.map(|service| service.port()).or(args.port);
    let mut reader = repair::StateReader::load(port)?;
    let prepared = repair::prepare_dump(Workers::PerCpu, discovery.into_fds())?;

    let started = Instant::now();
    let freeze_name = format!("dump-{}", args.pid);
    let own_freeze = match &args.freeze_dev {
        Some(dev) => {
            let mut guard = RemoveOnDrop::new(Freeze::attach(&netns, dev, &freeze_name)?);
            guard.freeze_tuples(&tuples, Duration::from_secs_f64(args.deadline))?;
            Some(guard)
        }
        None => {
            refuse_unfrozen(&netns, &tuples)?;
            None
        }
    };
    let freeze_time = started.elapsed();

    let started = Instant::now();
    // From here on, an error drops `dumped` (rolls back) and then `own_freeze` (lifts it).
    let dumped = prepared.dump(&mut reader)?;
    let dump_time = started.elapsed();
    let started = Instant::now();
    let encoded = image::encode(dumped.connections());
    image::write_file(&args.out, &encoded)?;
    let write_time = started.elapsed();
    let queued = Queued::of(dumped.connections());
    let connections = dumped.len();

    let started = Instant::now();
    match args.then {
        Then::Commit => {
            dumped.commit();
            own_freeze.map(RemoveOnDrop::keep);
        }
        Then::Rollback => dumped.rollback()?,
    }
    let then_time = started.elapsed();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let report = DumpReport {
        pid: args.pid,
        netns: &netns_spec,
        image: &args.out,
        connections,
        skipped,
        listening: &listening,
        queued,
        image_bytes: encoded.len(),
        then: args.then,
        freeze: args.freeze_dev.as_ref().map(|_| freeze_name),
        discover_us: us(discover_time),
        freeze_us: us(freeze_time),
        dump_us: us(dump_time),
        write_us: us(write_time),
        then_us: us(then_time),
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "dumped {} connections of pid {} to {} ({} bytes; queued: {} to send, {} of them never \
         sent, {} received unread) in {:.0} us; {}",
        report.connections,
        report.pid,
        args.out.display(),
        report.image_bytes,
        report.queued.send_bytes,
        report.queued.unsent_bytes,
        report.queued.recv_bytes,
        report.dump_us,
        match args.then {
            Then::Rollback => "rolled back: the connections carry on here",
            Then::Commit => "committed: the sockets here are closed silently",
        }
    );
    if skipped > 0 {
        println!("left out {skipped} connections in states tcpmig does not move");
    }
    Ok(())
}

/// A dump of connections whose traffic still flows would miss what arrives meanwhile.
fn refuse_unfrozen(netns: &Netns, tuples: &[Tuple]) -> anyhow::Result<()> {
    let left = freeze::unfrozen(netns, tuples)?;
    if left.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = left
        .iter()
        .take(NAMED_IN_ERRORS)
        .map(ToString::to_string)
        .collect();
    bail!(
        "{} of {} connections are not frozen ({}{}): their traffic would change the sockets \
         during the dump; freeze them first (tcpmig freeze --netns {} --dev IFACE --service \
         ADDR:PORT) or pass --freeze-dev IFACE",
        left.len(),
        tuples.len(),
        named.join(", "),
        if left.len() > NAMED_IN_ERRORS {
            ", ..."
        } else {
            ""
        },
        netns.spec()
    )
}

#[derive(serde::Serialize)]
struct RestoreReport<'a> {
    netns: &'a str,
    image: &'a std::path::Path,
    connections: usize,
    /// Out of repair mode and handed over.
    live: usize,
    /// Could not leave repair mode (closed silently), and the first error.
    failed: usize,
    first_failure: Option<String>,
    #[serde(flatten)]
    queued: Queued,
    /// "exec" or "unix".
    handoff: &'static str,
    read_us: f64,
    restore_us: f64,
    commit_us: f64,
}

/// Where the connections go, checked before anything is restored.
enum Target {
    Exec(ExecCommand),
    Unix(PathBuf),
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    migrate::check_privileges(Privileged::Restore)?;
    let started = Instant::now();
    let connections =
        image::read_file(&args.input).with_context(|| args.input.display().to_string())?;
    let read_time = started.elapsed();
    let netns = Netns::open(&args.netns)?;
    let target = match &args.to.handoff {
        Some(path) => {
            let is_socket = path.metadata().is_ok_and(|m| m.file_type().is_socket());
            if !is_socket {
                bail!(
                    "{} is not a Unix socket: start the receiver first (nothing was restored)",
                    path.display()
                );
            }
            Target::Unix(path.clone())
        }
        None => Target::Exec(ExecCommand::prepare(&args.to.command, connections.len())?),
    };
    let started = Instant::now();
    let restored = repair::restore(&netns, &connections)?;
    let restore_time = started.elapsed();
    let started = Instant::now();
    let committed = restored.commit();
    let commit_time = started.elapsed();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let report = RestoreReport {
        netns: netns.spec(),
        image: &args.input,
        connections: connections.len(),
        live: committed.sockets.len(),
        failed: committed.failures.len(),
        first_failure: committed.failures.first().map(ToString::to_string),
        queued: Queued::of(&connections),
        handoff: match target {
            Target::Exec(_) => "exec",
            Target::Unix(_) => "unix",
        },
        read_us: us(read_time),
        restore_us: us(restore_time),
        commit_us: us(commit_time),
    };
    for failure in &committed.failures {
        eprintln!("tcpmig: warning: {failure}");
    }
    match target {
        Target::Exec(command) => {
            // Stdout belongs to the command from here on.
            print_report(&report, args.json, true)?;
            netns.enter_current_thread()?;
            match handoff::exec_with_fds(committed.sockets, command)? {}
        }
        Target::Unix(path) => {
            handoff::send_fds(&committed.sockets, &path)?;
            print_report(&report, args.json, false)
        }
    }
}

fn print_report(report: &RestoreReport<'_>, json: bool, to_stderr: bool) -> anyhow::Result<()> {
    let line = if json {
        serde_json::to_string(report)?
    } else {
        format!(
            "restored {} of {} connections into {} in {:.0} us (repair off in {:.0} us){}; \
             handing them over ({})",
            report.live,
            report.connections,
            report.netns,
            report.restore_us,
            report.commit_us,
            if report.failed > 0 {
                format!("; {} failed and were closed silently", report.failed)
            } else {
                String::new()
            },
            report.handoff
        )
    };
    if to_stderr {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}
