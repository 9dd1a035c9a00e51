//! `tcpmig migrate` (source) and `tcpmig agent` (destination).
use std::{net::SocketAddr, os::fd::AsFd as _, time::Duration};

use clap::Args;
use tcpmig::{
    freeze::hold::HoldBudget,
    handoff::{self, ExecCommand},
    migrate::{
        self, AgentConfig, AgentReport, GuardOutcome, KeepAddress, LeftConnection, RebalanceReport,
        Report, Selector, SourceConfig,
    },
    sys::{Capability, CapabilitySet},
    tuple::Addresses,
};

use super::{handto::HandTo, link::LinkArgs, print_json};

#[derive(Args)]
pub struct MigrateArgs {
    /// The application whose connections move; it and its descendants are stopped (SIGSTOP)
    /// during the migration. Repeat it (or give a list) for an application of several processes
    /// in one network namespace, e.g. workers sharing the port with SO_REUSEPORT: their
    /// connections move together, in one freeze and one address move.
    #[arg(
        long = "pid",
        value_name = "PID",
        required = true,
        value_delimiter = ','
    )]
    pids: Vec<u32>,
    /// Local address and port of the connections; the address moves with them. Repeat it for
    /// a dual-stack service (`--service 192.0.2.1:80 --service [2001:db8::1]:80`): the
    /// connections of every address move in one migration, in one freeze, and every address
    /// moves.
    #[arg(long = "service", value_name = "ADDR:PORT", required = true)]
    services: Vec<SocketAddr>,
    /// Interface holding the service address, in the application's network namespace.
    #[arg(long, value_name = "IFACE")]
    dev: String,
    /// Where `tcpmig agent` listens.
    #[arg(long, value_name = "HOST:PORT")]
    to: SocketAddr,
    #[command(flatten)]
    link: LinkArgs,
    /// The name the agent's certificate must carry (a DNS name or an IP address subject
    /// alternative name). [default: the address of --to]
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    tls_name: Option<String>,
    /// End the application after the commit (SIGTERM, then SIGKILL after 5 s); without it the
    /// application is resumed and must close its migrated sockets (they fail with EPERM).
    #[arg(long)]
    stop_source: bool,
    /// Ask each process to stop itself with this signal (USR1, SIGUSR2, 10...) instead of
    /// stopping it with SIGSTOP: an application that handles it answers what it has read, then
    /// raise(SIGSTOP). Without it, bytes it has read but not answered when stopped are lost
    /// with --stop-source. It gets 5 s; otherwise the migration rolls back.
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    stop_signal: Option<libc::c_int>,
    /// Pre-copy: once the application is stopped, read its idle connections (those with
    /// nothing in their send queue) and have the agent restore them ahead of the freeze; in the
    /// blackout, those that did not move since cost a timestamp and leaving repair mode, and
    /// no peek. Pays off when most connections are quiet during the stop (idle keep-alive
    /// connections); those that moved are restored on fresh sockets.
    #[arg(long)]
    precopy: bool,
    /// Most bytes of segments the freeze holds for the destination, forwarded to its MAC once
    /// its connections are live (the clients are answered without waiting for their
    /// retransmission timers). Past it, or past --hold-packets, segments are dropped and their
    /// senders retransmit them. 0: hold nothing.
    #[arg(long, value_name = "BYTES", default_value_t = HoldBudget::DEFAULT.bytes)]
    hold_bytes: usize,
    /// Most segments the freeze holds (see --hold-bytes).
    #[arg(long, value_name = "N", default_value_t = HoldBudget::DEFAULT.packets)]
    hold_packets: usize,
    /// Move the other connections when some of the service cannot move (a connect or an
    /// accept in progress: SYN_SENT, SYN_RECV; one waiting in the accept queue), and list those
    /// left behind in the report. Without it such a migration refuses before the freeze,
    /// naming each one, and the application carries on.
    #[arg(long)]
    skip_unmovable: bool,
    /// Rebalance: move only the connections --select picks to the agent, whose application
    /// already serves (hand them over with `tcpmig agent --handoff`), and keep the service
    /// address here, where new connections keep arriving. This host then forwards the moved
    /// connections' segments to the agent's MAC (the agent must be on this interface's Ethernet
    /// segment); the agent holds the address on `lo`, silent. The application here pauses only
    /// while the chosen sockets are dumped and restored; its copies of them then read
    /// ECONNABORTED, and nothing is sent to their clients. Run from a host that holds the
    /// address on `lo` (a rebalance's destination), it moves connections back to the agent's
    /// host, which stops forwarding them. See docs/rebalance.md.
    #[arg(long, conflicts_with_all = ["stop_source", "precopy"])]
    keep_address: bool,
    /// Which connections a rebalance moves: `count=N`, `fraction=F` (0 < F <= 1),
    /// `client=CIDR[,CIDR...]` (their clients' networks) or `file=PATH` (one `LOCAL REMOTE`
    /// 4-tuple per line). [default: all of the service's]
    #[arg(long, value_name = "SELECTOR", requires = "keep_address")]
    select: Option<Selector>,
    /// Seconds a moved connection's forwarding lasts after its client closed it (its last ACK
    /// must pass).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60.0,
        requires = "keep_address"
    )]
    steer_grace: f64,
    /// Seconds a moved connection's forwarding lasts without a segment from its client.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 3600.0,
        requires = "keep_address"
    )]
    steer_idle: f64,
    /// Seconds to wait for each step of the agent.
    #[arg(long, value_name = "SECS", default_value_t = migrate::DEFAULT_STEP_TIMEOUT.as_secs_f64())]
    timeout: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A signal by name (with or without SIG) or number; SIGSTOP and SIGKILL cannot be handled.
fn parse_signal(text: &str) -> Result<libc::c_int, String> {
    const NAMES: [(&str, libc::c_int); 8] = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("WINCH", libc::SIGWINCH),
        ("PWR", libc::SIGPWR),
    ];
    let name = text.trim_start_matches("SIG");
    let number = match NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(&(_, number)) => number,
        None => text
            .parse()
            .map_err(|_| format!("{text}: give a signal name (USR1) or number"))?,
    };
    if !(1..=libc::SIGRTMAX()).contains(&number)
        || number == libc::SIGSTOP
        || number == libc::SIGKILL
    {
        return Err(format!("{text}: not a signal an application can handle"));
    }
    Ok(number)
}

#[derive(Args)]
pub struct AgentArgs {
    /// Address to wait for the source on.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// Network namespace to restore the connections in: a name under /run/netns or a path.
    #[arg(long, value_name = "NS", default_value = "/proc/self/ns/net")]
    netns: String,
    /// Interface that gets the service address, in that namespace.
    #[arg(long, value_name = "IFACE")]
    dev: String,
    #[command(flatten)]
    link: LinkArgs,
    /// Refuse images larger than this (the migration then rolls back).
    #[arg(long, value_name = "BYTES", default_value_t = migrate::DEFAULT_MAX_IMAGE_BYTES)]
    max_image_bytes: u64,
    /// Seconds to wait for each step of the source (and 60 times that for it to connect).
    #[arg(long, value_name = "SECS", default_value_t = migrate::DEFAULT_STEP_TIMEOUT.as_secs_f64())]
    timeout: f64,
    /// Print the report as JSON on stdout (before the command starts, with --exec).
    #[arg(long)]
    json: bool,
    /// Most connections one process of the application gets. More are restored in several
    /// groups, and CMD is started once per group (with TCPMIG_SHARD and TCPMIG_SHARDS set);
    /// the agent then waits for them all. [default: the fd limit less 67]
    #[arg(long, value_name = "N")]
    max_per_process: Option<usize>,
    /// Capabilities the application gets, separated by commas (CAP_NET_BIND_SERVICE or
    /// net_bind_service), as ambient capabilities; it gets no other, even as root (its bounding
    /// set holds these only). The agent keeps them until it starts the application.
    #[arg(
        long,
        value_name = "CAPS",
        default_value = "none",
        conflicts_with = "handoff"
    )]
    app_caps: CapabilitySet,
    /// Testing aid: stop (SIGSTOP) once this many image bytes arrived.
    #[arg(long, hide = true, value_name = "BYTES")]
    stop_after_image_bytes: Option<u64>,
    #[command(flatten)]
    to: HandTo,
}

fn timeout(secs: f64) -> anyhow::Result<Duration> {
    seconds("--timeout", secs)
}

/// A positive duration in seconds, or an error naming `option`.
pub fn seconds(option: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{option} {secs}: give a positive number of seconds"))
}

/// `tcpmig migrate-guard` (hidden): started by `tcpmig migrate`, which writes its notes on our
/// stdin; see tcpmig::migrate::guard.
#[derive(Args)]
pub struct GuardArgs {}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    tcpmig::sys::limit_heap_arenas();
    let config = SourceConfig {
        pids: args.pids,
        services: args.services,
        dev: args.dev,
        agent: args.to,
        security: args.link.client(args.to, args.tls_name.as_deref())?,
        token: args.link.token()?,
        stop_source: args.stop_source,
        stop_signal: args.stop_signal,
        precopy: args.precopy,
        hold: HoldBudget {
            bytes: args.hold_bytes,
            packets: args.hold_packets,
        },
        skip_unmovable: args.skip_unmovable,
        keep_address: match args.keep_address {
            true => Some(KeepAddress {
                select: args.select,
                steer_grace: seconds("--steer-grace", args.steer_grace)?,
                steer_idle: seconds("--steer-idle", args.steer_idle)?,
            }),
            false => None,
        },
        step_timeout: timeout(args.timeout)?,
        guard_exe: std::env::current_exe()?,
    };
    let report = migrate::migrate(&config)?;
    if args.json {
        print_json(&report)
    } else {
        print!("{}", summary(&report));
        Ok(())
    }
}

pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    // A missing program must not cost the connections: checked before anything moves.
    if args.to.handoff.is_none() {
        ExecCommand::prepare(&args.to.command, 0)?;
    }
    let config = AgentConfig {
        listen: args.listen,
        netns: args.netns.clone(),
        dev: args.dev,
        security: args.link.server()?,
        token: args.link.token()?,
        max_image_bytes: args.max_image_bytes,
        step_timeout: timeout(args.timeout)?,
        stop_after_image_bytes: args.stop_after_image_bytes,
        max_per_process: match args.max_per_process {
            Some(0) => anyhow::bail!("--max-per-process 0: give at least 1"),
            Some(max) => max,
            None => handoff::max_fds_per_process()?,
        },
        app_capabilities: args.app_caps,
        also_keep: match args.to.handoff {
            Some(_) => CapabilitySet::of(&[Capability::DacOverride]),
            None => CapabilitySet::EMPTY,
        },
    };
    let outcome = migrate::agent(&config)?;
    // stdout belongs to the application with --exec: the summary goes to stderr.
    eprint!(
        "{}",
        agent_summary(&outcome.report, outcome.source, &outcome.services)
    );
    if args.json {
        print_json(&outcome.report)?;
    }
    match args.to.handoff {
        Some(path) => Ok(outcome.live.send_to(&path)?),
        None => {
            let per_process = outcome.report.live.div_ceil(outcome.live.groups());
            let command = ExecCommand::prepare(&args.to.command, per_process)?;
            let status = outcome.live.run(command)?;
            std::process::exit(status.code().unwrap_or(1))
        }
    }
}

pub fn guard(_: GuardArgs) -> anyhow::Result<()> {
    let notes = std::io::stdin().as_fd().try_clone_to_owned()?;
    let said = match migrate::guard(notes)? {
        GuardOutcome::Finished => return Ok(()),
        GuardOutcome::RolledBack {
            migrate_pid,
            sockets,
            resumed,
        } => format!(
            "tcpmig migrate (pid {migrate_pid}) died before the commit: rolled back; {sockets} \
             connections out of repair mode, address kept, freeze removed, {resumed} processes \
             resumed"
        ),
        GuardOutcome::RolledForward { migrate_pid, ended } => format!(
            "tcpmig migrate (pid {migrate_pid}) died after deciding to commit: commit finished; \
             freeze removed, application {}",
            if ended { "ended" } else { "resumed" }
        ),
    };
    eprintln!("tcpmig migrate-guard: {said}");
    Ok(())
}

fn summary(r: &Report) -> String {
    let p = &r.phases;
    let d = &r.destination;
    format!(
        "migrated {kept}/{n} connections of {service} (pid {pids}) to {agent}{accepted}\n\
         blackout {blackout:.1} ms, total {total:.1} ms, image {image} bytes \
         (queued: {send} sent/unsent, {recv} unread)\n\
         phases (ms): prepare {prepare:.1}, stop {stop:.1}, discover {discover:.1}, pre-copy \
         {precopy:.1}, freeze {freeze:.3}, dump {dump:.1}, transfer {transfer:.1}, address {address:.1}, restore \
         {restore:.1}, commit {commit:.1}, finish {finish:.1}\n\
         destination (ms): on Prepare pool of {pooled} sockets {pool:.1} and freeze programs \
         {dfreeze:.1}; pre-copy of {precopied} {dprecopy:.1}, {kept_precopied} of them \
         kept; restore {drestore:.1}, address {daddress:.1}, repair off \
         {repair_off:.1}, {announcements} announcements\n\
         dropped while frozen: source {ssyn} SYNs, {sin} in, {sout} out; destination {dsyn} \
         SYNs, {din} in, {dout} out\n\
         held for the destination: {held} segments ({held_bytes} bytes), {forwarded} forwarded \
         to it in {forward:.1} ms ({forward_failed} failed); held by the destination's own \
         freeze {held_here}, {replayed} replayed there in {replay:.1} ms ({replay_failed} \
         failed); not held: {over_budget} over the budget, {queue_full} queue \
         full, {too_long} too long; {listener}\n{stopped}{skipped}",
        kept = r.kept,
        n = r.connections,
        accepted = match r.accepted {
            0 => String::new(),
            k => format!(", {k} of them taken from the application's accept queue"),
        },
        service = Addresses(&r.services),
        pids = r
            .pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        agent = r.agent,
        blackout = r.blackout_ms,
        total = r.total_ms,
        image = r.image_bytes,
        send = r.send_bytes,
        recv = r.recv_bytes,
        prepare = p.prepare_ms,
        stop = p.stop_ms,
        discover = p.discover_ms,
        precopy = p.precopy_ms,
        precopied = d.precopied,
        dprecopy = d.precopy_ms,
        kept_precopied = d.kept_precopied,
        freeze = p.freeze_ms,
        dump = p.dump_ms,
        transfer = p.transfer_ms,
        restore = p.restore_ms,
        address = p.address_ms,
        commit = p.commit_ms,
        finish = p.finish_ms,
        pooled = d.pooled,
        pool = d.pool_ms,
        drestore = d.restore_ms,
        dfreeze = d.freeze_ms,
        daddress = d.address_ms,
        repair_off = d.repair_off_ms,
        announcements = d.announcements,
        ssyn = r.dropped_source.syn,
        sin = r.dropped_source.ingress,
        sout = r.dropped_source.egress,
        dsyn = r.dropped_destination.syn,
        din = r.dropped_destination.ingress,
        dout = r.dropped_destination.egress,
        held = r.hold.packets,
        held_here = d.held_here.packets,
        held_bytes = r.hold.bytes,
        forwarded = r.forwarded.replayed,
        forward = p.forward_ms,
        forward_failed = r.forwarded.failed,
        replayed = d.replay.replayed,
        replay = d.replay_ms,
        replay_failed = d.replay.failed,
        over_budget = r.hold.over_budget,
        queue_full = r.hold.queue_full,
        too_long = r.hold.too_long,
        listener = if d.listener {
            "new connections went to the agent's listener, handed to the application"
        } else {
            "the service had a listener on the destination already"
        },
        stopped = match (&r.rebalance, r.source_stopped) {
            (Some(rebalance), _) => rebalance_summary(r, rebalance),
            (None, true) => "the source application was ended\n".to_owned(),
            (None, false) => {
                "the source application was resumed: it must close its migrated sockets\n"
                    .to_owned()
            }
        },
        skipped = left_summary(&r.left),
    )
}

/// What a rebalance moved, and what forwards it now.
fn rebalance_summary(r: &Report, rebalance: &RebalanceReport) -> String {
    let forwarding = match &rebalance.steering {
        Some(name) => format!(
            "this host forwards them to the agent (steering {name}, shown by `tcpmig status`)"
        ),
        None => "the host answering for the address forwards them no more".to_owned(),
    };
    format!(
        "rebalance: {picked} of {of} connections picked ({selector}), the address kept here; \
         {forwarding}\nthe application paused {paused:.1} ms, and was resumed: its copies of \
         the moved connections read ECONNABORTED\n",
        picked = rebalance.picked,
        of = rebalance.of,
        selector = rebalance.selector,
        paused = r.application_paused_ms,
    )
}

/// One line per connection left behind, with its state and why.
fn left_summary(left: &[LeftConnection]) -> String {
    let mut text = String::new();
    if !left.is_empty() {
        text.push_str(&format!("{} connections left behind:\n", left.len()));
    }
    for l in left {
        text.push_str(&format!(
            "  {} <-> {} {} ({})\n",
            l.local, l.remote, l.state, l.reason
        ));
    }
    text
}

fn agent_summary(r: &AgentReport, source: SocketAddr, services: &[SocketAddr]) -> String {
    let failed = match &r.first_failure {
        Some(first) => format!(", {} failed (first: {first})", r.failed),
        None => String::new(),
    };
    format!(
        "tcpmig agent: {live}/{restored} connections of {services} from {source} are live here{failed}\n",
        services = Addresses(services),
        live = r.live,
        restored = r.restored,
    )
}

#[cfg(test)]
mod tests {
    use super::parse_signal;

    #[test]
    fn signals_by_name_or_number_but_not_the_unhandleable_ones() {
        assert_eq!(parse_signal("USR1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("SIGusr2"), Ok(libc::SIGUSR2));
        assert_eq!(parse_signal("10"), Ok(10));
        for bad in ["STOP", "SIGKILL", "9", "19", "0", "SIGNOPE", "-1"] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }
}
