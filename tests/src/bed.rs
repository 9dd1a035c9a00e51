//! The bed: three hosts, each a network namespace with one veth `eth0` whose peer is a port of
//! the bridge `br0` in a fourth namespace.
//!
//! Namespace names are `tmb<pid>t<start>x<n>-{cli,src,dst,br}`: the owning process's pid and
//! start time (so a later process that reuses the pid is not taken for the owner) and a counter
//! per process, so concurrent test processes and concurrent tests never collide, and
//! [`sweep_stale`] can remove the beds of owners that died without unwinding.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use std::{fmt, fs, panic, thread};

use anyhow::{Context, Result};

use crate::process::{ChildGuard, Children};
use crate::{ns, sys, wait_until};

/// The one interface of every host.
pub const IFACE: &str = "eth0";
/// The bridge joining the hosts, in the bridge namespace.
pub const BRIDGE: &str = "br0";
/// The hosts' IPv4 subnet, 198.18.0.0/24 (the benchmarking range, RFC 2544).
pub const PREFIX_V4: u8 = 24;
/// The hosts' IPv6 subnet, fd54:636d::/64 (unique local).
pub const PREFIX_V6: u8 = 64;
/// The service address, on the source's `eth0` at first; a migration moves it.
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The IPv6 service address, on the source's `eth0` at first.
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0xfd54, 0x636d, 0, 0, 0, 0, 0, 0x100);

const NAME_PREFIX: &str = "tmb";
const BRIDGE_SUFFIX: &str = "br";
/// Links come up within milliseconds; this bounds a broken setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_BED: AtomicU32 = AtomicU32::new(0);

/// The part a host plays; it fixes the host's addresses and name suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Source,
    Destination,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Client, Role::Source, Role::Destination];

    /// The host's own IPv4 address: 198.18.0.{1,2,3}.
    pub fn v4(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, self.number())
    }

    /// The host's own IPv6 address: fd54:636d::{1,2,3}.
    pub fn v6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd54, 0x636d, 0, 0, 0, 0, 0, self.number().into())
    }

    fn number(self) -> u8 {
        self as u8 + 1
    }

    /// Suffix of the host's namespace name, also the name of its port on the bridge.
    fn suffix(self) -> &'static str {
        match self {
            Role::Client => "cli",
            Role::Source => "src",
            Role::Destination => "dst",
        }
    }
}

/// One host of a bed: a network namespace with `eth0`. Code and processes enter it with
/// [`Host::run`] and [`Host::command`].
pub struct Host {
    role: Role,
    name: String,
    children: Arc<Children>,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} host (netns {})", self.role, self.name)
    }
}

impl Host {
    pub fn role(&self) -> Role {
        self.role
    }

    /// The namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for tools that take a namespace path.
    pub fn path(&self) -> PathBuf {
        ns::netns_path(&self.name)
    }

    pub fn v4(&self) -> Ipv4Addr {
        self.role.v4()
    }

    pub fn v6(&self) -> Ipv6Addr {
        self.role.v6()
    }

    /// Runs `f` on a new thread inside this host's namespace and returns its result; a panic in
    /// `f` continues in the caller. Threads that `f` spawns are in the namespace too.
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

    /// A command that runs inside this host's namespace. Start it with [`Host::spawn`] so that the
    /// bed tracks it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        // Opened before fork: between fork and exec only the setns syscall runs.
        let netns = ns::open(&self.name)?;
        let mut cmd = Command::new(program);
        // SAFETY: the hook only makes a syscall, which is safe in the forked child.
        unsafe { cmd.pre_exec(move || sys::enter_netns(netns.as_fd())) };
        Ok(cmd)
    }

    /// Like [`Host::command`], but `program` gets `fds` as fds 3, 4, ... with LISTEN_FDS and
    /// LISTEN_PID set, as a socket-activation launcher (or `tcpmig restore --exec`) passes
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

    /// Starts `cmd` (from [`Host::command`]); the guard kills it when dropped.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard<'_>> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?} in {self}", cmd.get_program()))?;
        Ok(self.children.adopt(child))
    }

    /// Runs `ip -n NETNS ARGS` for this host and returns its output, e.g. to move the service
    /// address.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ns::ip(Some(&self.name), args).with_context(|| format!("in {self}"))
    }

    /// Reads a sysctl of this host, e.g. `net.ipv4.tcp_timestamps` (net.* is per namespace).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let value = self.run(|| fs::read_to_string(&path))?;
        Ok(value
            .with_context(|| format!("reading {} in {self}", path.display()))?
            .trim()
            .to_owned())
    }

    /// Sets a sysctl of this host, e.g. `set_sysctl("net.ipv4.tcp_sack", "0")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| fs::write(&path, value))?
            .with_context(|| format!("writing {value:?} to {} in {self}", path.display()))
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Three hosts on a bridge. Dropping it kills what its hosts still run and deletes its namespaces,
/// which removes the veths and the bridge with them.
pub struct TestBed {
    prefix: String,
    hosts: [Host; 3],
    children: Arc<Children>,
}

impl TestBed {
    /// Builds a bed (after removing the stale ones of dead test processes). Needs root.
    pub fn new() -> Result<Self> {
        // Two test processes may sweep the same stale bed at once; the loser must not fail.
        if let Err(e) = sweep_stale() {
            eprintln!("tcpmig-testbed: {e:#}");
        }
        let owner = owner_tag(std::process::id()).context("reading /proc/self/stat")?;
        let prefix = format!(
            "{NAME_PREFIX}{owner}x{}",
            NEXT_BED.fetch_add(1, Ordering::Relaxed)
        );
        let children = Arc::new(Children::default());
        let hosts = Role::ALL.map(|role| Host {
            role,
            name: format!("{prefix}-{}", role.suffix()),
            children: Arc::clone(&children),
        });
        let bed = Self {
            prefix,
            hosts,
            children,
        };
        // On error `bed` is dropped here, which removes whatever was built.
        bed.build()
            .with_context(|| format!("building test bed {} (needs root)", bed.prefix))?;
        Ok(bed)
    }

    fn build(&self) -> Result<()> {
        let bridge = self.bridge_netns();
        let mut namespaces = vec![format!("netns add {bridge}")];
        namespaces.extend(self.hosts.iter().map(|h| format!("netns add {}", h.name)));
        ns::ip_batch(None, &namespaces)?;

        ns::ip_batch(
            Some(&bridge),
            &[
                "link set lo up".into(),
                // No multicast snooping: IPv6 neighbour discovery must not depend on MLD reports.
                format!("link add {BRIDGE} type bridge mcast_snooping 0"),
                format!("link set {BRIDGE} up"),
            ],
        )?;
        for host in &self.hosts {
            let mut lines = vec![
                "link set lo up".into(),
                // Created from inside the host, so nothing ever appears in the root namespace.
                format!(
                    "link add {IFACE} type veth peer name {} netns {bridge}",
                    host.role.suffix()
                ),
                format!("addr add {}/{PREFIX_V4} dev {IFACE}", host.v4()),
                format!("addr add {}/{PREFIX_V6} dev {IFACE} nodad", host.v6()),
            ];
            if host.role == Role::Source {
                lines.push(format!("addr add {SERVICE_V4}/{PREFIX_V4} dev {IFACE}"));
                lines.push(format!(
                    "addr add {SERVICE_V6}/{PREFIX_V6} dev {IFACE} nodad"
                ));
            }
            lines.push(format!("link set {IFACE} up"));
            ns::ip_batch(Some(&host.name), &lines)?;
        }
        let ports: Vec<String> = Role::ALL
            .iter()
            .flat_map(|role| {
                let port = role.suffix();
                [
                    format!("link set {port} master {BRIDGE}"),
                    format!("link set {port} up"),
                ]
            })
            .collect();
        ns::ip_batch(Some(&bridge), &ports)?;
        wait_until("the bridge ports to forward", SETUP_TIMEOUT, || {
            self.ports_forwarding()
        })
    }

    /// Whether every bridge port is up (so is its veth peer) and forwarding.
    fn ports_forwarding(&self) -> Result<bool> {
        let out = ns::ip(
            Some(&self.bridge_netns()),
            &["-j", "-d", "link", "show", "master", BRIDGE],
        )?;
        let ports: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing ip -j output")?;
        Ok(ports.len() == self.hosts.len()
            && ports.iter().all(|port| {
                port["operstate"] == "UP"
                    && port["linkinfo"]["info_slave_data"]["state"] == "forwarding"
            }))
    }

    /// The prefix of this bed's namespace names; see [`namespaces_with_prefix`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace holding the bridge.
    pub fn bridge_netns(&self) -> String {
        format!("{}-{BRIDGE_SUFFIX}", self.prefix)
    }

    pub fn host(&self, role: Role) -> &Host {
        &self.hosts[role as usize]
    }

    pub fn client(&self) -> &Host {
        self.host(Role::Client)
    }

    pub fn source(&self) -> &Host {
        self.host(Role::Source)
    }

    pub fn destination(&self) -> &Host {
        self.host(Role::Destination)
    }

    /// The service address of one family: [`SERVICE_V6`] if `ipv6`, else [`SERVICE_V4`].
    pub fn service(ipv6: bool) -> IpAddr {
        if ipv6 {
            SERVICE_V6.into()
        } else {
            SERVICE_V4.into()
        }
    }

    /// Every pid started through this bed so far, to check after the drop that none survived.
    pub fn started_pids(&self) -> Vec<u32> {
        self.children.started()
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.children.kill_leaked();
        let removed = namespaces_with_prefix(&self.prefix).and_then(|names| {
            if !names.is_empty() {
                ns::delete(&names)?;
            }
            wait_until("the namespaces to disappear", SETUP_TIMEOUT, || {
                Ok(namespaces_with_prefix(&self.prefix)?.is_empty())
            })
        });
        if let Err(e) = removed {
            eprintln!("tcpmig-testbed: removing test bed {}: {e:#}", self.prefix);
        }
    }
}

/// Named namespaces of the bed with this prefix (see [`TestBed::prefix`]); empty once it is gone.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let own = format!("{prefix}-");
    Ok(ns::list()?
        .into_iter()
        .filter(|name| name.starts_with(&own))
        .collect())
}

/// Deletes the namespaces of beds whose owning process is gone, and returns their names. Kills
/// nothing: a process still inside such a namespace keeps it alive until it exits.
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

/// The owner's pid and tag from a bed namespace name; `None` for names that are not ours.
fn parse_owner(name: &str) -> Option<(u32, &str)> {
    let (bed, suffix) = name.strip_prefix(NAME_PREFIX)?.rsplit_once('-')?;
    let known = [BRIDGE_SUFFIX]
        .into_iter()
        .chain(Role::ALL.map(Role::suffix));
    if !known.into_iter().any(|s| s == suffix) {
        return None;
    }
    let (tag, counter) = bed.split_once('x')?;
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

    #[test]
    fn addresses() {
        assert_eq!(Role::Destination.v4(), Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(Role::Client.v6().to_string(), "fd54:636d::1");
        assert_eq!(SERVICE_V6.to_string(), "fd54:636d::100");
    }
}
