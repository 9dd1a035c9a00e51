//! Packet captures in a namespace of the bed: `tcpdump` writing to a file, read back as its
//! one-line summaries or as the frames themselves ([`announcements`] reads those), so a test can
//! assert on what crossed an interface.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::IFACE;
use crate::namespaces::Namespace;
use crate::process::ChildGuard;

/// A capture of the TCP segments of one port (or of what a filter selects) on [`IFACE`], stopped (SIGINT, so that it flushes)
/// by [`Capture::stop`]; dropping it unstopped kills tcpdump.
pub struct Capture<'bed> {
    child: ChildGuard<'bed>,
    file: PathBuf,
}

impl<'bed> Capture<'bed> {
    /// Starts tcpdump on `netns`'s `eth0` for `tcp port PORT`, and returns once it captures.
    pub fn start(netns: &'bed Namespace, port: u16) -> Result<Self> {
        Self::start_filtered(netns, &port.to_string(), &format!("tcp port {port}"))
    }

    /// Starts tcpdump on `netns`'s [`IFACE`] for what the pcap expression `filter` selects (its
    /// file named after `tag`), and returns once it captures.
    pub fn start_filtered(netns: &'bed Namespace, tag: &str, filter: &str) -> Result<Self> {
        Self::start_on(netns, IFACE, tag, filter)
    }

    /// Like [`Capture::start_filtered`], on `netns`'s interface `iface` (`lo` sees what a host
    /// sends itself).
    pub fn start_on(netns: &'bed Namespace, iface: &str, tag: &str, filter: &str) -> Result<Self> {
        let file = std::env::temp_dir().join(format!("{}-{iface}-{tag}.pcap", netns.name()));
        let mut cmd = netns.command("tcpdump")?;
        // --immediate-mode: without it libpcap hands packets over a ring block at a time (when
        // full, or after its timeout), and a capture stopped before that loses them all.
        cmd.args(["-i", iface, "-n", "-U", "--immediate-mode", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = netns.spawn(&mut cmd)?;
        let stderr = child.child_mut().stderr.take().context("tcpdump stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        // tcpdump says "listening on ..." once the capture runs; it is bounded by its own start.
        match lines.next() {
            Some(Ok(line)) if line.contains("listening on") => {}
            other => bail!("tcpdump did not start: {other:?}"),
        }
        Ok(Self { child, file })
    }

    /// Stops the capture and returns tcpdump's one-line summaries of the packets.
    pub fn stop(mut self) -> Result<Vec<String>> {
        self.stop_tcpdump()?;
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()?;
        let _ = std::fs::remove_file(&self.file);
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Stops the capture and returns the capture file's bytes (pcap: headers and the packets,
    /// whole), for a test that looks for bytes that must not cross the wire.
    pub fn stop_raw(mut self) -> Result<Vec<u8>> {
        self.stop_tcpdump()?;
        let bytes = std::fs::read(&self.file)?;
        let _ = std::fs::remove_file(&self.file);
        Ok(bytes)
    }

    fn stop_tcpdump(&mut self) -> Result<()> {
        // SAFETY: signalling a child we started and have not reaped, by its pid.
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "tcpdump did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}
