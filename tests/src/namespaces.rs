//! Owned network namespaces: [`Namespaces`] makes a group of them and removes them on drop (also
//! while unwinding from a panic), [`Namespace`] enters one. The [`TestBed`](crate::TestBed), the
//! tests that need only loopback and the benchmarks all make their namespaces here, so every one
//! is named, swept and removed the same way.
//!
//! Namespace names are `tmb<pid>t<start>x<n>-<suffix>`: the owning process's pid and start time
//! (so a later process that reuses the pid is not taken for the owner) and a counter per process,
//! so concurrent test processes and concurrent tests never collide, and [`sweep_stale`] can
//! remove the namespaces of owners that died without unwinding. The suffix is one of
//! [`SUFFIXES`], so names of other tools are never taken for ours.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use std::{fmt, fs, panic, thread};

use anyhow::{Context, Result, ensure};

use crate::process::{ChildGuard, Children};
use crate::{ns, sys, wait_until};

const NAME_PREFIX: &str = "tmb";
/// The suffixes a namespace of ours may have: the bed's bridge and hosts, and `lo` for a
/// namespace that only has its loopback.
pub const SUFFIXES: [&str; 6] = ["br", "cli", "src", "dst", "thd", "lo"];
/// Namespaces appear and disappear within milliseconds; this bounds a broken kernel or `ip`.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_GROUP: AtomicU32 = AtomicU32::new(0);

/// One namespace of a [`Namespaces`] group. Code and processes enter it with [`Namespace::run`]
/// and [`Namespace::command`]; the group kills what it still runs when it drops.
#[derive(Clone)]
pub struct Namespace {
    name: String,
    /// How errors name it, e.g. "Source host (netns NAME)".
    label: String,
    children: Arc<Children>,
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

impl Namespace {
    /// The namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for tools that take a namespace path.
    pub fn path(&self) -> PathBuf {
        ns::netns_path(&self.name)
    }

    /// The same namespace, named `label` in errors.
    pub(crate) fn labelled(&self, label: String) -> Self {
        Self {
            label,
            ..self.clone()
        }
    }

    /// Runs `f` on a new thread inside this namespace and returns its result; a panic in `f`
    /// continues in the caller. Threads that `f` spawns are in the namespace too.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let netns = ns::open(&self.name)?;
        thread::scope(|scope| {
            let worker = scope.spawn(move || sys::enter_netns(netns.as_fd()).map(|()| f()));
            match worker.join() {
                Ok(result) => result.with_context(|| format!("entering {self}")),
                Err(payload) => panic::resume_unwind(payload),
            }
        })
    }

    /// A command that runs inside this namespace. Start it with [`Namespace::spawn`] so that the
    /// group tracks it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        // Opened before fork: between fork and exec only the setns syscall runs.
        let netns = ns::open(&self.name)?;
        let mut cmd = Command::new(program);
        // SAFETY: the hook only makes a syscall, which is safe in the forked child.
        unsafe { cmd.pre_exec(move || sys::enter_netns(netns.as_fd())) };
        Ok(cmd)
    }

    /// Like [`Namespace::command`], but `program` gets `fds` as fds 3, 4, ... with LISTEN_FDS
    /// and LISTEN_PID set, as a socket-activation launcher (or `tcpmig restore --exec`) passes
    /// restored connections. Arguments added to the command go to `program`.
    pub fn command_with_listen_fds(
        &self,
        program: impl AsRef<OsStr>,
        fds: Vec<OwnedFd>,
    ) -> Result<Command> {
        // LISTEN_PID is the pid of the program, known only after fork: a shell that execs keeps it.
        let mut cmd = self.command("/bin/sh")?;
        cmd.args(["-c", r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#])
            .arg(program)
            .env("LISTEN_FDS", fds.len().to_string());
        let mut plan = sys::FdPlan::new(fds, 3);
        // SAFETY: both steps only make syscalls, which is safe in the forked child.
        unsafe {
            cmd.pre_exec(move || {
                sys::raise_nofile_limit()?;
                plan.apply()
            })
        };
        Ok(cmd)
    }

    /// Starts `cmd` (from [`Namespace::command`]); the guard kills it when dropped.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard<'_>> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?} in {self}", cmd.get_program()))?;
        Ok(self.children.adopt(child))
    }

    /// Runs `ip -n NETNS ARGS` here and returns its output, e.g. to move the service address.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ns::ip(Some(&self.name), args).with_context(|| format!("in {self}"))
    }

    /// Runs several `ip` commands here, one per line, in one `ip -n NETNS -batch -`.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        ns::ip_batch(Some(&self.name), lines).with_context(|| format!("in {self}"))
    }

    /// Reads a sysctl here, e.g. `net.ipv4.tcp_timestamps` (net.* is per namespace).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let value = self.run(|| fs::read_to_string(&path))?;
        Ok(value
            .with_context(|| format!("reading {} in {self}", path.display()))?
            .trim()
            .to_owned())
    }

    /// Sets a sysctl here, e.g. `set_sysctl("net.ipv4.tcp_sack", "0")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| fs::write(&path, value))?
            .with_context(|| format!("writing {value:?} to {} in {self}", path.display()))
    }

    /// One of this namespace's `Tcp:` counters in /proc/net/snmp, e.g. `OutRsts`.
    pub fn tcp_counter(&self, name: &str) -> Result<u64> {
        let snmp = self
            .run(|| fs::read_to_string("/proc/thread-self/net/snmp"))?
            .with_context(|| format!("reading /proc/net/snmp in {self}"))?;
        crate::nstat::counter(&snmp, "Tcp", name)
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// A group of namespaces with one name prefix, `lo` up in each. Dropping it kills what they still
/// run and deletes them, which removes their interfaces with them.
pub struct Namespaces<const N: usize> {
    prefix: String,
    members: [Namespace; N],
    children: Arc<Children>,
}

impl<const N: usize> Namespaces<N> {
    /// Makes one namespace per suffix (each one of [`SUFFIXES`], none twice), after removing the
    /// stale ones of dead test processes. Needs root.
    pub fn new(suffixes: [&str; N]) -> Result<Self> {
        for (k, suffix) in suffixes.iter().enumerate() {
            ensure!(
                SUFFIXES.contains(suffix),
                "unknown namespace suffix {suffix}"
            );
            ensure!(!suffixes[..k].contains(suffix), "suffix {suffix} twice");
        }
        // Two test processes may sweep the same stale namespaces at once; the loser must not fail.
        if let Err(e) = sweep_stale() {
            eprintln!("tcpmig-testbed: {e:#}");
        }
        let owner = owner_tag(std::process::id()).context("reading /proc/self/stat")?;
        let prefix = format!(
            "{NAME_PREFIX}{owner}x{}",
            NEXT_GROUP.fetch_add(1, Ordering::Relaxed)
        );
        let children = Arc::new(Children::default());
        let members = suffixes.map(|suffix| {
            let name = format!("{prefix}-{suffix}");
            Namespace {
                label: format!("netns {name}"),
                name,
                children: Arc::clone(&children),
            }
        });
        let group = Self {
            prefix,
            members,
            children,
        };
        let adds: Vec<String> = group
            .members
            .iter()
            .map(|member| format!("netns add {}", member.name))
            .collect();
        // On error `group` is dropped here, which removes whatever was made.
        ns::ip_batch(None, &adds).context("making namespaces (needs root)")?;
        for member in &group.members {
            member.ip(&["link", "set", "lo", "up"])?;
        }
        Ok(group)
    }

    /// The prefix of the names; see [`namespaces_with_prefix`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespaces, in the order of their suffixes.
    pub fn members(&self) -> &[Namespace; N] {
        &self.members
    }

    /// Every pid started in these namespaces so far, to check after the drop that none survived.
    pub fn started_pids(&self) -> Vec<u32> {
        self.children.started()
    }
}

impl<const N: usize> Drop for Namespaces<N> {
    fn drop(&mut self) {
        self.children.kill_leaked();
        let removed = namespaces_with_prefix(&self.prefix).and_then(|names| {
            if !names.is_empty() {
                ns::delete(&names)?;
            }
            wait_until("the namespaces to disappear", REMOVE_TIMEOUT, || {
                Ok(namespaces_with_prefix(&self.prefix)?.is_empty())
            })
        });
        if let Err(e) = removed {
            eprintln!("tcpmig-testbed: removing namespaces {}: {e:#}", self.prefix);
        }
    }
}

/// Named namespaces of the group with this prefix (see [`Namespaces::prefix`]); empty once it is
/// gone.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let own = format!("{prefix}-");
    Ok(ns::list()?
        .into_iter()
        .filter(|name| name.starts_with(&own))
        .collect())
}

/// Deletes the namespaces whose owning process is gone, and returns their names. Kills nothing: a
/// process still inside such a namespace keeps it alive until it exits.
pub fn sweep_stale() -> Result<Vec<String>> {
    let stale: Vec<String> = ns::list()?
        .into_iter()
        .filter(|name| {
            parse_owner(name).is_some_and(|(pid, tag)| owner_tag(pid).as_deref() != Some(tag))
        })
        .collect();
    if !stale.is_empty() {
        ns::delete(&stale).context("removing stale test beds")?;
    }
    Ok(stale)
}

/// `<pid>t<start time>` of a live process; start time in clock ticks since boot.
fn owner_tag(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command name (field 2) may contain spaces, so count from its closing ')'.
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{pid}t{start}"))
}

/// The owner's pid and tag from a namespace name; `None` for names that are not ours.
fn parse_owner(name: &str) -> Option<(u32, &str)> {
    let (group, suffix) = name.strip_prefix(NAME_PREFIX)?.rsplit_once('-')?;
    if !SUFFIXES.contains(&suffix) {
        return None;
    }
    let (tag, counter) = group.split_once('x')?;
    let (pid, start) = tag.split_once('t')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(start) && digits(counter)).then_some(())?;
    Some((pid.parse().ok()?, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_round_trip() {
        let tag = owner_tag(std::process::id()).unwrap();
        let name = format!("{NAME_PREFIX}{tag}x7-src");
        assert_eq!(parse_owner(&name), Some((std::process::id(), tag.as_str())));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "tmb",
            "tmb12t3x4",
            "tmb12t3x4-eth",
            "tmbat3x4-br",
            "tmb12t3x-br",
            "other-br",
        ] {
            assert_eq!(parse_owner(name), None, "{name}");
        }
    }
}
