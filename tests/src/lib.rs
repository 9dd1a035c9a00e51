//! Multi-host test bed for tcpmig, on real network namespaces: the one place where tests, the
//! benchmarks and `tcpmig demo` make namespaces and traffic.
//!
//! # Namespaces
//! A [`TestBed`] is four hosts (`client`, `source`, `destination` and `third`, a second
//! destination), each a network namespace with one veth `eth0` plugged into a bridge that lives
//! in a namespace of its own. The source also carries
//! the service address ([`SERVICE_V4`], [`SERVICE_V6`]) that a migration later moves
//! ([`TestBed::without_service`] leaves it out, for tests of the network plane). Whatever needs
//! another shape (one namespace with only `lo`, the repair benchmark's two places of the
//! migrating ends and their peers) makes a [`Namespaces`] group, which the bed itself is built
//! on: the same names, the same removal on drop, the same [`sweep_stale`].
//!
//! # Traffic
//! Every byte of traffic in the tests, the benchmarks and `tcpmig demo` comes from one program,
//! this crate's `tcpmig-peer`, in one of three modes for three measurements:
//! - Byte-exact streams (`server`, `client`; [`peer`]), with [`Traffic`] to fill a bed:
//!   command-driven streams for correctness. Servers on the source and clients on the client
//!   host; each direction of every connection carries bytes of a known [`pattern`], and every
//!   byte is checked on request, also after the sockets have been handed to a new process on
//!   another host. The tests, the demo and the benchmarks' set-ups (the repair benchmark's idle
//!   peers, the CRIU references' mirror server) use it.
//! - Open-loop latency load (`load-worker`; [`load`], with [`LoadRun`]): small messages on a
//!   fixed schedule whatever the echoes do, each echo checked byte for byte, with latency
//!   histograms measured from the scheduled send time and each connection's longest silence,
//!   through a migration. Its timing is what it measures, so a worker is one epoll thread that
//!   its caller only starts and marks, with none of the streams' stop-and-check round trips.
//! - Echo server (`echo-server`; [`echo`], with [`EchoServers`]): the other end of that load,
//!   echoing every byte back; it stops itself only between echoes when asked, so that a
//!   migration of it loses nothing, and it takes over restored sockets as the new server.
//!
//! # Capture
//! [`Capture`] records the segments of one port (or what a filter selects) on a host's `eth0`
//! (tcpdump), for tests that assert on what crossed the wire; [`announcements`] reads the
//! gratuitous ARPs and neighbour advertisements in such a capture.
//!
//! Everything is RAII: dropping a [`Traffic`], a [`Peer`], a [`LoadRun`], [`EchoServers`] or a
//! [`ChildGuard`] kills its processes, dropping the [`TestBed`] or a [`Namespaces`] group (also
//! while unwinding from a panic) removes its namespaces, and [`sweep_stale`] removes those of
//! test processes that died without unwinding. Every wait is bounded.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use tcpmig_testbed::{TestBed, Traffic};
//! let bed = TestBed::new()?;
//! // In an integration test: Path::new(env!("CARGO_BIN_EXE_tcpmig-peer")).
//! let peer = std::path::Path::new("target/debug/tcpmig-peer");
//! let mut traffic = Traffic::open(&bed, peer, 100, 1024, 8080)?;
//! assert!(traffic.verify()?.all_verified(100));
//! # Ok(()) }
//! ```

pub mod announcement;
pub mod bed;
mod capture;
pub mod containers;
pub mod echo;
pub mod line_process;
pub mod load;
pub mod loaded;
pub mod namespaces;
mod ns;
pub mod nstat;
pub mod pattern;
pub mod peer;
pub mod peer_process;
pub mod pki;
pub mod probe;
mod process;
pub mod sys;
pub mod traffic;

pub use announcement::{Announcement, NaFlags, announcements};
pub use bed::{
    BRIDGE, Host, IFACE, PREFIX_V4, PREFIX_V6, Role, SERVICE_V4, SERVICE_V6, TestBed, prefix_len,
};
pub use capture::Capture;
pub use echo::EchoServers;
pub use line_process::LineProcess;
pub use load::{LoadConfig, LoadReport, LoadRun};
pub use loaded::TokenFile;
pub use namespaces::{Namespace, Namespaces, namespaces_with_prefix, sweep_stale};
pub use ns::netns_path;
pub use nstat::TcpCounters;
pub use peer::{Peer, PeerArgs, PeerCommand, PeerMode, Report, StreamArgs, command_all};
pub use pki::Pki;
pub use probe::{ProbeArgs, ProbeReport, ProbeRun};
pub use process::{ChildGuard, KillGroupOnDrop, line_reader};
pub use traffic::{MAX_SOCKETS_PER_PEER, Traffic, Verification};

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `tcpmig` binary of the integration tests' own build: the target directory two levels up
/// from the test executable (`target/<profile>/deps/<test>`; `cargo xtask test` builds it first).
pub fn tcpmig_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .join("tcpmig");
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask test` or `cargo build -p tcpmig-cli`",
        bin.display()
    );
    bin
}

/// Runs the tcpmig binary with `args`, stdin closed, and returns its output.
pub fn tcpmig<I, S>(args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use anyhow::Context as _;
    Command::new(tcpmig_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running tcpmig")
}

/// Runs tcpmig and returns its stdout; an error with its stderr if it failed.
pub fn tcpmig_ok<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let out = tcpmig(&args)?;
    anyhow::ensure!(
        out.status.success(),
        "tcpmig {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Polls `ready` until it returns true or `timeout` passes; `what` names the wait in the error.
pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
