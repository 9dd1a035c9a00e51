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
    handoff::{self, ExecCommand},
    image,
    migrate::{
        self, Privileged,
        checkpoint::{self, Checkpoint, Queued},
    },
    net::Netns,
    repair,
};

use super::{handto::HandTo, print_json};

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

/// What the source sockets do once the image is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Then {
    /// Leave repair mode: the connections carry on here (a checkpoint). A --freeze-dev freeze is
    /// lifted.
    Rollback,
    /// Close the sockets silently (no FIN, no RST): the connections now live in the image only.
    /// Keep the freeze on until they are restored elsewhere, or the peers' next segments are
    /// answered with RSTs here; a --freeze-dev freeze stays pinned until its deadline.
    Commit,
}

impl From<Then> for checkpoint::Then {
    fn from(then: Then) -> Self {
        match then {
            Then::Rollback => checkpoint::Then::Rollback,
            Then::Commit => checkpoint::Then::Commit,
        }
    }
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

pub fn dump(args: DumpArgs) -> anyhow::Result<()> {
    if !(args.deadline.is_finite() && args.deadline > 0.0) {
        bail!("--deadline must be a positive number of seconds");
    }
    let report = Checkpoint {
        pid: args.pid,
        netns: args.netns,
        port: args.port,
        service: args.service,
        out: args.out,
        freeze_dev: args.freeze_dev,
        deadline: Duration::from_secs_f64(args.deadline),
        then: args.then.into(),
    }
    .run()?;
    if args.json {
        return print_json(&report);
    }
    println!(
        "dumped {} connections of pid {} to {} ({} bytes; queued: {} to send, {} of them never \
         sent, {} received unread) in {:.0} us; {}",
        report.connections,
        report.pid,
        report.image.display(),
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
    if report.skipped > 0 {
        println!("left out {} connections:", report.skipped);
    }
    for left in &report.left {
        println!(
            "  {} <-> {} {} ({})",
            left.local, left.remote, left.state, left.reason
        );
    }
    Ok(())
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
