//! Processes started in a test bed: a guard per child, and the bed's list of them.

use std::collections::BTreeSet;
use std::io::{self, BufRead as _, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// A killed process is gone within milliseconds, even with 15,000 sockets to close; this only
/// bounds a process stuck in the kernel.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// The pids a bed started: the ones still guarded, and all of them, so that a test can check that
/// none survived the bed.
#[derive(Default)]
pub(crate) struct Children {
    live: Mutex<BTreeSet<u32>>,
    started: Mutex<Vec<u32>>,
}

impl Children {
    pub(crate) fn adopt(&self, child: Child) -> ChildGuard<'_> {
        let pid = child.id();
        lock(&self.live).insert(pid);
        lock(&self.started).push(pid);
        ChildGuard {
            child,
            children: self,
        }
    }

    pub(crate) fn started(&self) -> Vec<u32> {
        lock(&self.started).clone()
    }

    /// Kills and reaps children whose guard was leaked (`mem::forget`): a guard cannot outlive
    /// its bed otherwise.
    pub(crate) fn kill_leaked(&self) {
        let leaked = std::mem::take(&mut *lock(&self.live));
        for pid in leaked {
            let pid = pid as libc::pid_t;
            // SAFETY: `pid` is our unreaped child (its guard never ran), so it names that process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + REAP_TIMEOUT;
            // SAFETY: reaping our own child; no status wanted.
            while unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == 0
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A process started in a bed's host: dropping it kills it (SIGKILL by pid) and reaps it.
pub struct ChildGuard<'bed> {
    child: Child,
    children: &'bed Children,
}

impl ChildGuard<'_> {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The std handle, e.g. to take its stdio pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits up to `timeout` for it to exit (reaping it); `None` if it still runs then (it is
    /// left running: dropping the guard kills it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Kills a process group on drop: a server started in a session of its own (setsid) and the
/// workers it forked, which killing the server alone leaves running.
pub struct KillGroupOnDrop(u32);

impl KillGroupOnDrop {
    /// `leader` must lead a group this test created (its pid is the group id).
    pub fn new(leader: u32) -> Self {
        Self(leader)
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let group = -(self.0 as libc::pid_t);
        // SAFETY: kill(2) with a negative pid signals that process group and nothing else; an
        // empty group only makes it fail with ESRCH.
        unsafe { libc::kill(group, libc::SIGKILL) };
    }
}

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        // std sends nothing to a child it already reaped, so a reused pid is never hit.
        let _ = self.child.kill();
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                Ok(None) => {
                    eprintln!(
                        "tcpmig-testbed: pid {} still alive {REAP_TIMEOUT:?} after SIGKILL",
                        self.pid()
                    );
                    return;
                }
                _ => break,
            }
        }
        lock(&self.children.live).remove(&self.pid());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lines a child writes to `pipe`, read on a thread named `name`. The thread ends when the
/// pipe closes (the child is gone) or nobody listens any more; nobody waits for it.
pub fn line_reader(pipe: impl Read + Send + 'static, name: &str) -> io::Result<Receiver<String>> {
    let (sender, lines) = mpsc::channel();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        })?;
    Ok(lines)
}
