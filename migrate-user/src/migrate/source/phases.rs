//! The source's phases up to the agent's GoingLive, one type each: [`Prepared`] (the agent is
//! ready) -> [`Discovered`] (the application's sockets are taken while it still runs) ->
//! [`Stopped`] (the application is) -> [`CaughtUp`] (the sockets it opened or closed since the
//! discovery are taken or let go: every socket is known) -> [`Frozen`] (the blackout starts) ->
//! [`Dumped`] -> [`Sent`] -> [`Restored`] (by the agent) -> Commit sent and GoingLive received.
//! The clients see the application silent from the stop on, so only the catch-up (and the
//! pre-copy, which needs the application stopped) lies between the stop and the freeze. Each
//! phase borrows the [`Run`], which keeps what a rollback undoes: on an error the caller rolls
//! back from there.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use super::{
    Held, PRECOPY_QUIET, Rebalancing, SourceConfig,
    image::{Part, send_image},
    shard_work::{Known, catch_up_process, held_unmovable, prepare_process, take_accepted},
};
use crate::{
    freeze::hold::{Forwarder, Segments},
    migrate::{
        FREEZE_TTL, LeftConnection, MigrateError, MovedAddress, Report, StoppedTree,
        guard::{Guardian, Note},
        millis, test_pause,
        transport::{Link, Message},
    },
    net::{self, Netns},
    repair::{self, AcceptPlan, Filter, Listed, SocketsByInode, Unmovable},
    shard::{self, Shard},
    tuple::Tuple,
};

/// What the phases work on: the link, the guard, what the source holds while the migration can
/// still be undone, and the report each phase adds its time to.
pub(super) struct Run<'a> {
    pub(super) config: &'a SourceConfig,
    pub(super) netns: &'a Netns,
    pub(super) link: &'a mut Link,
    pub(super) guardian: &'a mut Guardian,
    pub(super) held: Held,
    /// The services whose connections move, and the addresses that move with them (in a
    /// rebalance, those the agent holds quietly).
    pub(super) services: Vec<SocketAddr>,
    pub(super) addresses: Vec<MovedAddress>,
    /// A rebalance: the chosen connections move, the addresses stay.
    pub(super) rebalancing: Option<Rebalancing>,
    pub(super) report: Report,
}

impl Run<'_> {
    /// The connections that move: the services', or a rebalance's choice.
    fn filter(&self) -> Arc<Filter> {
        Arc::new(match &self.rebalancing {
            Some(rebalancing) => Filter::among(&self.services, Arc::clone(&rebalancing.picked)),
            None => Filter::services(&self.services),
        })
    }

    /// Connections that stay behind, found before the freeze: a refusal naming them if one of
    /// them is a connection lost (closed ones are not), unless `--skip-unmovable`; then listed in
    /// the report.
    fn leave(&mut self, left: Vec<Unmovable>) -> Result<(), MigrateError> {
        let lost: Vec<Unmovable> = left.iter().filter(|u| u.is_loss()).copied().collect();
        if !lost.is_empty() && !self.config.skip_unmovable {
            return Err(MigrateError::Unmovable {
                services: self.services.clone(),
                list: Listed(lost),
            });
        }
        self.record_left(&left);
        Ok(())
    }

    fn record_left(&mut self, left: &[Unmovable]) {
        if !left.is_empty() {
            tracing::info!(count = left.len(), list = %Listed(left.to_vec()), "left behind");
        }
        self.report.skipped += left.len();
        (self.report.left).extend(left.iter().map(LeftConnection::from));
    }
}

/// Everything up to the agent's GoingLive, the answer to Commit. The report's `blackout_ms`
/// holds the part up to Commit sent, `phases.commit_ms` the wait for GoingLive.
pub(super) async fn until_live(run: &mut Run<'_>) -> Result<(), MigrateError> {
    let stopped = Prepared::wait(run).await?.discover()?.stop()?;
    let frozen = stopped.catch_up()?.precopy().await?.freeze()?;
    let sent = frozen.dump()?.send().await?;
    sent.restored().await?.commit().await
}

/// The agent made its pool and attached its freeze programs.
pub(super) struct Prepared<'r, 'a>(&'r mut Run<'a>);

impl<'r, 'a> Prepared<'r, 'a> {
    async fn wait(run: &'r mut Run<'a>) -> Result<Self, MigrateError> {
        let step = "waiting for the agent to prepare";
        match run.link.recv_message(step, None).await? {
            Message::Prepared { mac, has_addresses } => {
                if let Some(rebalancing) = &mut run.rebalancing {
                    rebalancing.prepared(run.netns, &run.config.dev, mac, has_addresses)?;
                }
                if let (Some(_), Some(mac)) = (&run.held.hold, mac) {
                    let (dev, services) = (&run.config.dev, &run.services);
                    let only = run.rebalancing.as_ref().map(|r| Arc::clone(&r.picked));
                    let forwarder = Forwarder::open(run.netns, dev, mac, services, only)?;
                    run.held.forwarder = Some(forwarder);
                }
                Ok(Self(run))
            }
            other => Err(run.link.unexpected(step, &other)),
        }
    }

    /// While the application runs: takes each process's connections into a shard of its own
    /// and reads what only the application changes; the guard learns which sockets to roll
    /// back.
    fn discover(self) -> Result<Discovered<'r, 'a>, MigrateError> {
        let run = self.0;
        let step = Instant::now();
        for &pid in &run.config.pids {
            let shard =
                Shard::spawn(format!("pid-{pid}")).map_err(|source| MigrateError::Process {
                    pid,
                    what: "starting a thread for its sockets",
                    source,
                })?;
            run.held.shards.push(shard);
        }
        let filter = run.filter();
        // One listing for all the processes.
        let listed = Arc::new(SocketsByInode::list(run.netns, &filter)?);
        let pids = run.config.pids.clone();
        let found = shard::run_all(&run.held.shards, move |k, sockets| {
            prepare_process(pids[k], &filter, &listed, sockets)
        });
        let (mut noted, mut left) = (Vec::new(), Vec::new());
        for found in found {
            let found = found?;
            left.extend(found.left);
            noted.extend(found.sockets);
        }
        run.leave(left)?;
        if noted.is_empty() {
            let (pid, services) = (run.config.pids[0], run.services.clone());
            return Err(MigrateError::NoConnections { pid, services });
        }
        refuse_shared(noted.iter().map(|&(inode, _)| inode).collect())?;
        run.guardian.note(&Note::Sockets { sockets: noted })?;
        run.report.phases.discover_ms = millis(step.elapsed());
        test_pause("discovered");
        Ok(Discovered(run))
    }
}

/// A socket shared by two of the processes (inherited over fork) would be dumped twice.
fn refuse_shared(mut inodes: Vec<u64>) -> Result<(), MigrateError> {
    inodes.sort_unstable();
    match inodes.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(MigrateError::SharedSocket { inode: pair[0] }),
        None => Ok(()),
    }
}

/// The connections are taken and prepared, the guard knows their sockets; the application
/// still runs.
pub(super) struct Discovered<'r, 'a>(&'r mut Run<'a>);

impl<'r, 'a> Discovered<'r, 'a> {
    /// Stops the application's process trees (told to the guard first): the clients' silence
    /// starts. New connections stop first (held for the destination): a handshake the source's
    /// kernel completed from here on would wait in an accept queue the stopped application
    /// never reads, and move nowhere.
    fn stop(self) -> Result<Stopped<'r, 'a>, MigrateError> {
        let run = self.0;
        let at = Instant::now();
        run.guardian.note(&Note::Stopping)?;
        // In a rebalance new connections stay here.
        if run.rebalancing.is_none() {
            if let Some(hold) = &mut run.held.hold {
                hold.begin(Segments::Syns)?;
            }
            run.held
                .freeze
                .freeze_new_connections(&run.services, FREEZE_TTL)?;
        }
        run.held.stopped_at = Some(at);
        for &pid in &run.config.pids {
            let stopped = StoppedTree::stop(pid, run.config.stop_signal)?;
            run.held.stopped.push(stopped);
        }
        run.report.processes_stopped = run.held.stopped.iter().map(StoppedTree::len).sum();
        run.report.phases.stop_ms = millis(at.elapsed());
        test_pause("stopped");
        Ok(Stopped { run, at })
    }
}

/// The application's processes are stopped (since `at`): their sockets hold still.
pub(super) struct Stopped<'r, 'a> {
    run: &'r mut Run<'a>,
    at: Instant,
}

impl<'r, 'a> Stopped<'r, 'a> {
    /// What the application did between the discovery and the stop: in each shard, the
    /// connections it accepted since are taken and prepared, those it closed let go, and the
    /// options read again. The guard learns the new sockets (and any SO_REUSEADDR that changed)
    /// before any of them enters repair mode.
    fn catch_up(self) -> Result<CaughtUp<'r, 'a>, MigrateError> {
        let Self { run, at } = self;
        let step = Instant::now();
        let (pids, netns) = (run.config.pids.clone(), run.netns);
        let filter = run.filter();
        let shared = Arc::clone(&filter);
        // New SYNs are held: the handshakes in progress end within a round trip, in an accept
        // queue (taken below) or in the fd table. Their listing (a walk of the kernel's whole
        // connection table, about 7 ms) runs beside the fd tables' catch-up. A rebalance's
        // choice is none of them (and new connections keep coming).
        let bound = match filter.picks() {
            true => std::time::Duration::ZERO,
            false => repair::HANDSHAKE_BOUND,
        };
        let (waiting, caught) = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                repair::wait_until(netns, &filter, bound, |w| {
                    filter.picks() || w.handshakes == 0
                })
            });
            let caught = shard::run_all(&run.held.shards, move |k, sockets| {
                catch_up_process(pids[k], &shared, sockets)
            });
            let waiting = waiting
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (waiting, caught)
        });
        let waiting = waiting?;
        let (mut noted, mut taken, mut closed) = (Vec::new(), 0, 0);
        let mut left = Vec::new();
        for caught in caught {
            let caught = caught?;
            left.extend(caught.left);
            (taken, closed) = (taken + caught.taken, closed + caught.closed);
            noted.extend(caught.noted);
        }
        let plan = AcceptPlan::list(netns, &filter, &waiting)?;
        if !plan.is_empty() {
            let (plan, shared) = (Arc::new(plan), Arc::clone(&filter));
            let pids = run.config.pids.clone();
            let accepted = shard::run_all(&run.held.shards, move |k, sockets| {
                take_accepted(pids[k], &shared, &plan, sockets)
            });
            for accepted in accepted {
                let accepted = accepted?;
                run.report.accepted += accepted;
                taken += accepted;
            }
        }
        // What still waits in an accept queue (of a listener these processes do not hold) or
        // in a handshake stays there (see repair::unaccepted). With new SYNs held nothing
        // queues now: when no handshake was pending and every queued connection was taken,
        // none is left to name.
        if !filter.picks() && (waiting.handshakes > 0 || run.report.accepted < waiting.queued()) {
            left.extend(repair::unaccepted(run.netns, &filter)?);
        }
        run.leave(left)?;
        if taken > 0 {
            let all = shard::run_all(&run.held.shards, |_, sockets| {
                let taken = sockets.known.taken.iter();
                taken.map(|&(inode, _)| inode).collect::<Vec<_>>()
            });
            refuse_shared(all.concat())?;
        }
        if !noted.is_empty() {
            run.guardian.note(&Note::Sockets { sockets: noted })?;
        }
        let took_ms = millis(step.elapsed());
        tracing::info!(
            taken,
            closed,
            accepted = run.report.accepted,
            took_ms,
            "caught up with the stopped application"
        );
        Ok(CaughtUp { run, stopped: at })
    }
}

/// Every socket of the service in the stopped application is taken and prepared, and the
/// guard knows them.
pub(super) struct CaughtUp<'r, 'a> {
    run: &'r mut Run<'a>,
    stopped: Instant,
}

impl<'r, 'a> CaughtUp<'r, 'a> {
    /// With `--precopy`: one reader pass, each process's connections that were quiet for
    /// [`PRECOPY_QUIET`] read in its shard, the image of them sent (it may hold none), and the
    /// agent's Precopied awaited. Without, nothing. It puts the connections it reads in repair
    /// mode, where a running application's send() would fail: hence after the stop.
    async fn precopy(self) -> Result<Self, MigrateError> {
        let Self { run, stopped } = self;
        if !run.config.precopy {
            return Ok(Self { run, stopped });
        }
        let step = Instant::now();
        let states = Arc::new(run.held.reader.read(run.netns)?);
        let parts = shard::run_all(&run.held.shards, move |_, sockets| {
            let prepared = sockets
                .prepared
                .as_mut()
                .expect("prepared before the pre-copy");
            Part::of(&prepared.precopy(&states, PRECOPY_QUIET))
        });
        let (connections, _) = send_image(run.link, &parts, None).await?;
        let waiting = "waiting for the agent to restore the pre-copy";
        match run.link.recv_message(waiting, None).await? {
            Message::Precopied { connections: ahead } => {
                tracing::info!(connections, ahead, "pre-copied");
            }
            other => return Err(run.link.unexpected(waiting, &other)),
        }
        run.report.phases.precopy_ms = millis(step.elapsed());
        Ok(Self { run, stopped })
    }

    /// One map update: the blackout starts.
    fn freeze(self) -> Result<Frozen<'r, 'a>, MigrateError> {
        let Self { run, stopped } = self;
        let at = Instant::now();
        run.report.stop_to_freeze_ms = millis(at.duration_since(stopped));
        if let Some(hold) = &mut run.held.hold {
            hold.begin(Segments::All)?;
        }
        match &run.rebalancing {
            Some(rebalancing) => {
                let picked: Vec<Tuple> = rebalancing.picked.iter().copied().collect();
                run.held.freeze.freeze_tuples(&picked, FREEZE_TTL)?;
            }
            None => run.held.freeze.freeze_services(&run.services, FREEZE_TTL)?,
        }
        run.report.phases.freeze_ms = millis(at.elapsed());
        test_pause("frozen");
        Ok(Frozen { run, at })
    }
}

/// The service is frozen: the blackout runs since `at`.
pub(super) struct Frozen<'r, 'a> {
    run: &'r mut Run<'a>,
    at: Instant,
}

impl<'r, 'a> Frozen<'r, 'a> {
    /// One pass of the reader for every process (they share the namespace), then each shard
    /// dumps its sockets, which stay in repair mode.
    fn dump(self) -> Result<Dumped<'r, 'a>, MigrateError> {
        let Self { run, at } = self;
        let step = Instant::now();
        let states = Arc::new(run.held.reader.read(run.netns)?);
        let dumped = shard::run_all(&run.held.shards, move |_, sockets| {
            let prepared = sockets.prepared.take().expect("prepared before the dump");
            // What the catch-up compared the fd table with: not needed any more.
            sockets.known = Known::default();
            let dumped = sockets.dumped.insert(prepared.dump_read(&states)?);
            Ok::<_, MigrateError>(held_unmovable(dumped.skipped()))
        });
        for left in dumped {
            // Closed since the catch-up (the application is stopped: by its peer): no loss.
            run.record_left(&left?);
        }
        run.report.phases.dump_ms = millis(step.elapsed());
        test_pause("dumped");
        Ok(Dumped { run, frozen_at: at })
    }
}

/// Every socket is in repair mode and read.
pub(super) struct Dumped<'r, 'a> {
    run: &'r mut Run<'a>,
    frozen_at: Instant,
}

impl<'r, 'a> Dumped<'r, 'a> {
    /// Streams the image (each shard encodes its records: the connections are not copied out
    /// of them), then deletes the service's addresses while the agent restores: they are of no
    /// use here any more (the freeze drops the service's traffic), and a rollback puts them
    /// back.
    async fn send(self) -> Result<Sent<'r, 'a>, MigrateError> {
        let Self { run, frozen_at } = self;
        let step = Instant::now();
        let parts = shard::run_all(&run.held.shards, |_, sockets| {
            let connections = sockets.dumped.as_ref().map_or(&[][..], |d| d.connections());
            Part::of(connections)
        });
        let (connections, image_bytes) = send_image(run.link, &parts, Some("mid-transfer")).await?;
        let report = &mut run.report;
        report.connections = connections;
        report.image_bytes = image_bytes;
        report.send_bytes = parts.iter().map(|p| p.send_bytes).sum();
        report.unsent_bytes = parts.iter().map(|p| p.unsent_bytes).sum();
        report.recv_bytes = parts.iter().map(|p| p.recv_bytes).sum();
        report.phases.transfer_ms = millis(step.elapsed());
        let step = Instant::now();
        // Before the first: a rollback after any of them puts back all (adding one that is
        // there is a no-op). A rebalance keeps them.
        if run.rebalancing.is_none() {
            run.held.address_deleted = true;
            for &MovedAddress { ip, prefix_len } in &run.addresses {
                net::delete_address(run.netns, &run.config.dev, ip, prefix_len)?;
            }
        }
        run.report.phases.address_ms = millis(step.elapsed());
        test_pause("address-deleted");
        Ok(Sent {
            run,
            frozen_at,
            connections,
        })
    }
}

/// The image is sent and the address deleted; the agent restores `connections`.
pub(super) struct Sent<'r, 'a> {
    run: &'r mut Run<'a>,
    frozen_at: Instant,
    connections: usize,
}

impl<'r, 'a> Sent<'r, 'a> {
    async fn restored(self) -> Result<Restored<'r, 'a>, MigrateError> {
        let Self {
            run,
            frozen_at,
            connections,
        } = self;
        let step = Instant::now();
        let waiting = "waiting for the agent to restore";
        match run.link.recv_message(waiting, None).await? {
            Message::Restored {
                connections: restored,
                ..
            } if restored == connections => {}
            other => return Err(run.link.unexpected(waiting, &other)),
        }
        run.report.phases.restore_ms = millis(step.elapsed());
        test_pause("restored");
        Ok(Restored { run, frozen_at })
    }
}

/// A rebalance's moved connections, forwarded to the agent from here on: the agent's freeze
/// drops what comes before it is live (a rollback removes the steering).
fn steer(run: &mut Run<'_>) -> Result<(), MigrateError> {
    let Some(rebalancing) = &mut run.rebalancing else {
        return Ok(());
    };
    let tuples = shard::run_all(&run.held.shards, |_, sockets| {
        let dumped = sockets.dumped.as_ref().map_or(&[][..], |d| d.connections());
        dumped.iter().map(|c| c.tuple).collect::<Vec<Tuple>>()
    });
    rebalancing.steer(run.netns, &run.config.dev, &tuples.concat())
}

/// The agent restored every connection in repair mode: the source can decide to commit.
pub(super) struct Restored<'r, 'a> {
    run: &'r mut Run<'a>,
    frozen_at: Instant,
}

impl Restored<'_, '_> {
    /// The decision, recorded before it is sent: if we die from here on, the guard finishes the
    /// commit instead of rolling back. Then Commit, and the agent's GoingLive.
    async fn commit(self) -> Result<(), MigrateError> {
        let Self { run, frozen_at } = self;
        steer(run)?;
        run.guardian.note(&Note::Committing)?;
        let answer_within_ms = run.link.timeout().as_millis() as u64;
        run.link.send(&Message::Commit { answer_within_ms }).await?;
        run.report.blackout_ms = millis(frozen_at.elapsed());
        let commit_sent = Instant::now();
        test_pause("committed");
        let waiting = "waiting for the agent to go live";
        match run.link.recv_message(waiting, None).await? {
            Message::GoingLive => {}
            other => return Err(run.link.unexpected(waiting, &other)),
        }
        run.report.phases.commit_ms = millis(commit_sent.elapsed());
        Ok(())
    }
}
