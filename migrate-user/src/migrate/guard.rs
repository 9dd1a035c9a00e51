//! The guard of a migration on the source: a small process (`tcpmig migrate-guard`, hidden) that
//! `migrate` starts before it changes anything, and that outlives it.
//!
//! `migrate` stops the application and puts its sockets in repair mode, where they refuse reads
//! and writes. Killed there (kill -9, OOM), it would leave the application stopped and its
//! connections dead; the freeze lifts itself at its deadline, but that does not help them. So
//! `migrate` tells its guard, over a pipe, one JSON [`Note`] per line, what it is about to do;
//! the guard watches it with a pidfd and, if it dies before it noted Committing, rolls the source
//! back: the address back, the sockets (found again by inode in the application, with
//! pidfd_getfd) out of repair mode, the freeze removed, the process tree resumed. If it dies
//! after Committing, the commit is finished instead: the application ended (--stop-source) or
//! resumed, the freeze removed. A `migrate` that ends by itself notes Done and the guard exits.
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read as _, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    unistd::getppid,
};
use serde::{Deserialize, Serialize};

use super::{MigrateError, MovedAddress, StoppedTree};
use crate::{
    freeze::{self, FreezeError},
    net::{self, Netns},
    repair::{self, Filter},
    sys::{pidfd_open, pidfd_wait_exit, tcp_repair as so},
};

/// The hidden subcommand of the tcpmig binary that runs [`guard`], its notes on stdin.
pub const GUARD_COMMAND: &str = "migrate-guard";
/// A migration takes seconds; a guard whose `migrate` still runs after this gives up watching,
/// touching nothing.
const GUARD_LIMIT: Duration = Duration::from_secs(3600);
/// How long `migrate` waits for its guard to exit after Done, and the guard for `migrate` to be
/// gone after its notes ended.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `migrate` tells its guard, in this order (Sockets, Committing and RollingBack only if it
/// gets that far): Start, Sockets (those taken while the application runs), Stopping, Sockets
/// again (those it opened before it stopped, and any whose SO_REUSEADDR changed), Committing.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub(super) enum Note {
    /// Before anything changes: what a rollback must restore.
    Start(Plan),
    /// The application's process tree is about to be stopped.
    Stopping,
    /// Sockets that may enter repair mode: inode, and whether SO_REUSEADDR was on (repair mode
    /// overwrites it); a later note adds to the earlier ones, or corrects them.
    Sockets { sockets: Vec<(u64, bool)> },
    /// Written before Commit is sent: from here on, finish the commit instead of rolling back.
    Committing,
    /// The agent did not take the commit after all: roll back.
    RollingBack,
    /// `migrate` ended by itself; nothing to do.
    Done,
}

/// `migrate`'s end of the pipe to its guard.
pub(super) struct Guardian {
    child: Child,
    notes: ChildStdin,
}

impl Guardian {
    /// Starts `exe migrate-guard` and gives it `start` (a [`Note::Start`]).
    pub(super) fn start(exe: &Path, start: &Note) -> Result<Self, MigrateError> {
        let mut child = Command::new(exe)
            .arg(GUARD_COMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Its own process group: a Ctrl-C meant for `migrate` must not kill the guard too.
            .process_group(0)
            .spawn()
            .map_err(|source| MigrateError::Guard {
                what: "starting it",
                source,
            })?;
        let notes = child.stdin.take().expect("stdin is piped");
        let mut guardian = Self { child, notes };
        guardian.note(start)?;
        Ok(guardian)
    }

    /// Records `note`; an error means the guard is gone, so nothing irreversible may follow.
    pub(super) fn note(&mut self, note: &Note) -> Result<(), MigrateError> {
        let mut line = serde_json::to_vec(note).expect("notes serialize");
        line.push(b'\n');
        self.notes
            .write_all(&line)
            .map_err(|source| MigrateError::Guard {
                what: "recording the progress of the migration",
                source,
            })
    }

    /// `migrate` ends by itself: the guard is told so and exits without acting.
    pub(super) fn finish(mut self) {
        if let Err(error) = self.note(&Note::Done) {
            tracing::warn!(%error, "telling the guard that the migration ended");
        }
        drop(self.notes);
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::warn!(pid = self.child.id(), "the guard did not exit");
    }
}

/// The inode of a socket and whether SO_REUSEADDR is on: what the guard needs to find it again
/// and take it out of repair mode as it was.
pub(super) fn identify(fd: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
    let inode = File::from(fd.try_clone_to_owned()?).metadata()?;
    let reuse = so::get_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    Ok((std::os::unix::fs::MetadataExt::ino(&inode), reuse != 0))
}

/// What the guard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardOutcome {
    /// `migrate` ended by itself (or died before it said anything).
    Finished,
    /// `migrate` died before deciding to commit: the source was rolled back.
    RolledBack {
        migrate_pid: u32,
        /// Sockets taken out of repair mode (the others were not in it yet).
        sockets: usize,
        /// Processes resumed.
        resumed: usize,
    },
    /// `migrate` died after deciding to commit: the commit was finished at the source.
    RolledForward {
        migrate_pid: u32,
        /// Whether the application was ended (--stop-source) rather than resumed.
        ended: bool,
    },
}

/// The migration `migrate` is about to make.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Plan {
    pub(super) migrate_pid: u32,
    pub(super) pids: Vec<u32>,
    pub(super) services: Vec<SocketAddr>,
    pub(super) dev: String,
    /// Each deleted while the agent restores, and put back by a rollback.
    pub(super) addresses: Vec<MovedAddress>,
    pub(super) freeze: String,
    /// A rebalance's steering, made for this migration: a rollback removes it.
    #[serde(default)]
    pub(super) steering: Option<String>,
    pub(super) stop_source: bool,
}

/// What the notes said so far.
#[derive(Default)]
struct Progress {
    start: Option<Start>,
    stopping: bool,
    sockets: HashMap<u64, bool>,
    committing: bool,
    done: bool,
}

struct Start {
    plan: Plan,
    /// Opened at once, while the application surely lives.
    netns: Netns,
}

impl Start {
    /// The application's processes that still exist.
    fn alive(&self) -> impl Iterator<Item = u32> + '_ {
        self.plan
            .pids
            .iter()
            .copied()
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }
}

impl Progress {
    fn apply(&mut self, note: Note) -> Result<(), MigrateError> {
        match note {
            Note::Start(plan) => {
                let pid = plan.pids.first().copied().unwrap_or_default();
                let netns = Netns::open(&format!("/proc/{pid}/ns/net"))?;
                self.start = Some(Start { plan, netns });
            }
            Note::Stopping => self.stopping = true,
            Note::Sockets { sockets } => self.sockets.extend(sockets),
            Note::Committing => self.committing = true,
            Note::RollingBack => self.committing = false,
            Note::Done => self.done = true,
        }
        Ok(())
    }
}

/// Runs the guard: reads `migrate`'s notes from `notes` (its stdin) until `migrate` ends, and
/// acts if it died.
pub fn guard(notes: OwnedFd) -> Result<GuardOutcome, MigrateError> {
    let mut reader = NoteReader {
        file: File::from(notes),
        partial: Vec::new(),
    };
    let mut progress = Progress::default();
    let mut watched: Option<OwnedFd> = None;
    let deadline = Instant::now() + GUARD_LIMIT;
    let mut notes_open = true;
    let migrate_gone = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!("the migration still runs after {GUARD_LIMIT:?}: no longer guarded");
            return Ok(GuardOutcome::Finished);
        }
        let mut fds = Vec::with_capacity(2);
        if notes_open {
            fds.push(PollFd::new(reader.file.as_fd(), PollFlags::POLLIN));
        }
        // Last, when there is one.
        if let Some(pidfd) = &watched {
            fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
        }
        // At most a second, so it fits.
        let timeout = PollTimeout::from(left.as_millis().min(1000) as u16);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(guard_error("waiting for the migration", errno.into())),
        }
        // Any event, also one nix has no name for.
        let woke = |fd: &PollFd<'_>| fd.any() != Some(false);
        let dead = watched.is_some() && fds.last().is_some_and(woke);
        if notes_open && woke(&fds[0]) {
            notes_open = reader.read_into(&mut progress)?;
            if watched.is_none()
                && let Some(start) = &progress.start
            {
                match watch(start.plan.migrate_pid) {
                    Some(pidfd) => watched = Some(pidfd),
                    // Gone before we looked: the notes already say all there is.
                    None => break true,
                }
            }
        }
        if dead {
            break true;
        }
        if !notes_open {
            break false;
        }
    };
    // Everything it wrote before it died is still in the pipe.
    while reader.read_into(&mut progress)? {}
    let Some(start) = progress.start.take() else {
        return Ok(GuardOutcome::Finished);
    };
    if progress.done {
        return Ok(GuardOutcome::Finished);
    }
    if !migrate_gone
        && let Some(pidfd) = &watched
        && !pidfd_wait_exit(pidfd, Instant::now() + EXIT_TIMEOUT)
    {
        return Err(guard_error(
            "its notes ended but it did not exit",
            io::Error::from(io::ErrorKind::TimedOut),
        ));
    }
    if progress.committing {
        roll_forward(&start)
    } else {
        roll_back(&start, &progress)
    }
}

/// A pidfd of `migrate`, which started us: `None` if it is already gone (we were re-parented, so
/// the pid may name another process by now).
fn watch(migrate_pid: u32) -> Option<OwnedFd> {
    let pidfd = pidfd_open(migrate_pid).ok()?;
    (u32::try_from(getppid().as_raw()) == Ok(migrate_pid)).then_some(pidfd)
}

/// The read end of the notes: whole lines are applied as they arrive.
struct NoteReader {
    file: File,
    partial: Vec<u8>,
}

impl NoteReader {
    /// Reads what is there and applies the complete notes; returns false at the end of the pipe.
    fn read_into(&mut self, progress: &mut Progress) -> Result<bool, MigrateError> {
        let mut chunk = [0u8; 64 << 10];
        let got = loop {
            match self.file.read(&mut chunk) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                other => break other.map_err(|e| guard_error("reading the notes", e))?,
            }
        };
        self.partial.extend_from_slice(&chunk[..got]);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let note = serde_json::from_slice(&line).map_err(|e| {
                guard_error(
                    "reading the notes",
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            })?;
            progress.apply(note)?;
        }
        Ok(got > 0)
    }
}

/// Undoes what a dead `migrate` did, in its order: address back, sockets out of repair mode,
/// freeze removed, application resumed. Every step runs even if one fails; the first error is
/// returned after all were tried.
fn roll_back(start: &Start, progress: &Progress) -> Result<GuardOutcome, MigrateError> {
    tracing::warn!(
        migrate_pid = start.plan.migrate_pid,
        "tcpmig migrate died before the commit: rolling back"
    );
    let mut first_error = None;
    // Deleted while the agent restores; adding an address that is there is a no-op.
    for &MovedAddress { ip, prefix_len } in &start.plan.addresses {
        if let Err(error) = net::add_address(&start.netns, &start.plan.dev, ip, prefix_len) {
            first_error.get_or_insert(error.into());
        }
    }
    let mut sockets = 0;
    let mut resumed = 0;
    for pid in start.alive() {
        if !progress.sockets.is_empty() {
            match release_sockets(start, pid, &progress.sockets) {
                Ok(count) => sockets += count,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
    }
    if let Err(error) = remove_freeze(&start.plan.freeze) {
        first_error.get_or_insert(error);
    }
    if let Some(name) = &start.plan.steering
        && let Err(error) = freeze::Steering::remove(name)
    {
        first_error.get_or_insert(error.into());
    }
    if progress.stopping {
        for pid in start.alive() {
            match StoppedTree::adopt(pid) {
                // Dropping it resumes it.
                Ok(tree) => resumed += tree.len(),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(GuardOutcome::RolledBack {
            migrate_pid: start.plan.migrate_pid,
            sockets,
            resumed,
        }),
    }
}

/// Finishes the commit of a dead `migrate`: the application's repair-mode sockets closed silently
/// by ending it (or it resumes, and its sockets fail until it closes them), the freeze removed.
fn roll_forward(start: &Start) -> Result<GuardOutcome, MigrateError> {
    tracing::warn!(
        migrate_pid = start.plan.migrate_pid,
        "tcpmig migrate died after deciding to commit: finishing the commit"
    );
    let mut result = Ok(());
    for pid in start.alive() {
        result = result.and(StoppedTree::adopt(pid).and_then(|tree| {
            if start.plan.stop_source {
                tree.terminate()
            } else {
                Ok(())
            }
        }));
    }
    let removed = remove_freeze(&start.plan.freeze);
    result.and(removed).map(|()| GuardOutcome::RolledForward {
        migrate_pid: start.plan.migrate_pid,
        ended: start.plan.stop_source,
    })
}

fn remove_freeze(name: &str) -> Result<(), MigrateError> {
    match freeze::remove(name) {
        Ok(()) | Err(FreezeError::NotFound(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Takes the sockets of process `pid` that `migrate` noted and that are in repair mode out of
/// it; returns how many. One process at a time: each may hold as many as one fd table can.
fn release_sockets(
    start: &Start,
    pid: u32,
    noted: &HashMap<u64, bool>,
) -> Result<usize, MigrateError> {
    let discovery = repair::discover(&start.netns, pid, &Filter::services(&start.plan.services))?;
    let mut released = 0;
    for taken in &discovery.sockets {
        let fd = taken.fd.as_fd();
        let fail = |what| {
            let tuple = taken.tuple;
            move |error| {
                guard_error(
                    what,
                    io::Error::other(format!("connection {tuple}: {error}")),
                )
            }
        };
        let (inode, _) = identify(fd).map_err(fail("identifying a socket"))?;
        let Some(&reuse) = noted.get(&inode) else {
            continue;
        };
        if !so::in_repair(fd).map_err(fail("reading TCP_REPAIR"))? {
            continue;
        }
        // Repair off as a rollback does it (see sys::tcp_repair::leave_repair).
        so::leave_repair(fd, reuse).map_err(|(op, error)| fail(op)(error))?;
        released += 1;
    }
    Ok(released)
}

fn guard_error(what: &'static str, source: io::Error) -> MigrateError {
    MigrateError::Guard { what, source }
}
