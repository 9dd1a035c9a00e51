//! Stopping the source application: between the snapshot of its sockets and the commit it must
//! not read, write or close them, so its whole process tree is stopped with SIGSTOP first.
use std::{
    io,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use super::MigrateError;
use crate::sys::{pidfd_open, pidfd_send_signal, pidfd_wait_exit};

/// A stopped process tree: resumed (SIGCONT) when dropped, unless [`terminate`](Self::terminate)d.
#[derive(Debug)]
pub struct StoppedTree {
    /// The root first, then its descendants, each with a pidfd so that a reused pid is never
    /// signalled.
    members: Vec<(u32, OwnedFd)>,
}

/// How long a process may take to reach the stopped state, or to exit after SIGTERM.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

impl StoppedTree {
    /// Stops `pid` and every descendant (threads included: SIGSTOP stops the whole process) and
    /// waits until each is in the stopped state. With `ask`, `pid` is first sent that signal
    /// and given `SETTLE_TIMEOUT` (5 s) to stop itself: an application that handles it can finish
    /// what it holds in memory (bytes read and not yet answered, which no dump of its sockets
    /// sees) and then raise(SIGSTOP).
    pub fn stop(pid: u32, ask: Option<libc::c_int>) -> Result<Self, MigrateError> {
        if let Some(signal) = ask {
            wait_for_self_stop(pid, signal)?;
        }
        let tree = Self::walk(pid, Some(libc::SIGSTOP))?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for (member, _) in &tree.members {
            while !matches!(state(*member), Some('T' | 't' | 'Z' | 'X') | None) {
                if Instant::now() > deadline {
                    return Err(MigrateError::Process {
                        pid: *member,
                        what: "waiting for it to stop",
                        source: io::Error::from(io::ErrorKind::TimedOut),
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(tree)
    }

    /// The tree of `pid` as it is now, without signalling it: for the guard of a migration that
    /// died, which resumes (drop) or ends ([`terminate`](Self::terminate)) what it had stopped.
    pub fn adopt(pid: u32) -> Result<Self, MigrateError> {
        Self::walk(pid, None)
    }

    /// Opens a pidfd for `pid` and each descendant, sending `signal` to each as it is found.
    fn walk(pid: u32, signal_each: Option<libc::c_int>) -> Result<Self, MigrateError> {
        let mut tree = Self {
            members: Vec::new(),
        };
        // Children forked while we walk are caught by walking again until nothing is new.
        for _ in 0..8 {
            let pids = tree_of(pid).map_err(|source| process_error(pid, "listing", source))?;
            let mut grew = false;
            for member in pids {
                if tree.members.iter().any(|(p, _)| *p == member) {
                    continue;
                }
                let Ok(fd) = pidfd_open(member) else {
                    // Exited meanwhile; only the root matters.
                    if member == pid {
                        return Err(process_error(pid, "opening", io::Error::last_os_error()));
                    }
                    continue;
                };
                if let Some(sig) = signal_each {
                    pidfd_send_signal(&fd, sig)
                        .map_err(|source| process_error(member, "stopping", source))?;
                }
                tree.members.push((member, fd));
                grew = true;
            }
            if !grew {
                break;
            }
        }
        Ok(tree)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Ends the tree after a commit: SIGTERM and SIGCONT (a stopped process only acts on SIGTERM
    /// once continued), SIGKILL for whoever is still there after a grace period.
    pub fn terminate(mut self) -> Result<(), MigrateError> {
        let members = std::mem::take(&mut self.members);
        for (pid, fd) in &members {
            pidfd_send_signal(fd, libc::SIGTERM)
                .and_then(|()| pidfd_send_signal(fd, libc::SIGCONT))
                .or_else(ignore_exited)
                .map_err(|source| process_error(*pid, "terminating", source))?;
        }
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for (pid, fd) in &members {
            if !pidfd_wait_exit(fd, deadline) {
                tracing::warn!(pid, "still running after SIGTERM: sending SIGKILL");
                pidfd_send_signal(fd, libc::SIGKILL)
                    .or_else(ignore_exited)
                    .map_err(|source| process_error(*pid, "killing", source))?;
            }
        }
        Ok(())
    }
}

impl Drop for StoppedTree {
    fn drop(&mut self) {
        for (pid, fd) in &self.members {
            if let Err(error) = pidfd_send_signal(fd, libc::SIGCONT).or_else(ignore_exited) {
                tracing::warn!(pid, %error, "resuming a stopped process");
            }
        }
    }
}

/// Sends `signal` to `pid` and waits until it stopped itself. If it does not in time, it is sent
/// SIGCONT (in case it stops later) and the error says so.
fn wait_for_self_stop(pid: u32, ask: libc::c_int) -> Result<(), MigrateError> {
    let fd = pidfd_open(pid).map_err(|source| process_error(pid, "opening", source))?;
    pidfd_send_signal(&fd, ask)
        .map_err(|source| process_error(pid, "asking it to stop", source))?;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !matches!(state(pid), Some('T' | 't') | None) {
        if Instant::now() > deadline {
            let _ = pidfd_send_signal(&fd, libc::SIGCONT);
            return Err(process_error(
                pid,
                "waiting for it to stop itself after the --stop-signal",
                io::Error::from(io::ErrorKind::TimedOut),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn process_error(pid: u32, what: &'static str, source: io::Error) -> MigrateError {
    MigrateError::Process { pid, what, source }
}

fn ignore_exited(error: io::Error) -> io::Result<()> {
    if error.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(error)
    }
}

/// `pid` and all its descendants, from /proc/PID/task/TID/children.
fn tree_of(pid: u32) -> io::Result<Vec<u32>> {
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() {
        let parent = all[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks {
            let path = task?.path().join("children");
            let children = std::fs::read_to_string(path).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(all)
}

/// The state letter of /proc/PID/stat (R, S, T, Z...), `None` once the process is gone.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use super::*;

    /// A shell that stops itself on SIGUSR1 (or ignores it), killed when dropped.
    struct Shell(Child);

    impl Shell {
        fn start(on_usr1: &str) -> Self {
            let script = format!("trap '{on_usr1}' USR1; echo up; while :; do sleep 0.05; done");
            let mut child = Command::new("sh")
                .args(["-c", &script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // The trap is set once it says so.
            let mut up = [0u8; 3];
            std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut up).unwrap();
            Self(child)
        }
    }

    impl Drop for Shell {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn an_application_asked_to_stop_stops_itself_and_resumes_on_drop() {
        let shell = Shell::start("kill -STOP $$");
        let pid = shell.0.id();
        let tree = StoppedTree::stop(pid, Some(libc::SIGUSR1)).unwrap();
        assert_eq!(state(pid), Some('T'));
        drop(tree);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while state(pid) == Some('T') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(state(pid), Some('T'));
    }

    #[test]
    fn an_application_that_does_not_stop_itself_is_refused_and_left_running() {
        let shell = Shell::start("");
        let pid = shell.0.id();
        let error = StoppedTree::stop(pid, Some(libc::SIGUSR1)).unwrap_err();
        assert!(error.to_string().contains("stop itself"), "{error}");
        assert_ne!(state(pid), Some('T'));
    }
}
