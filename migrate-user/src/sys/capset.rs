//! Dropping capabilities: a thread keeps only what it still uses ([`drop_all_but`]), and what it
//! executes gets only what it is given ([`confine_for_exec`]); a forked child that executes
//! nothing empties its own ([`clear_after_fork`]).
//!
//! Capabilities belong to threads, not processes: a thread started afterwards inherits those of
//! the thread that starts it, one started before keeps its own.
use std::io;

use super::{CapabilityError, CapabilitySet};

/// A thread's five capability sets, as /proc/thread-self/status shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadCapabilities {
    pub effective: CapabilitySet,
    pub permitted: CapabilitySet,
    pub inheritable: CapabilitySet,
    pub bounding: CapabilitySet,
    pub ambient: CapabilitySet,
}

impl ThreadCapabilities {
    /// The calling thread's sets.
    pub fn of_this_thread() -> Result<Self, CapabilityError> {
        let status = std::fs::read_to_string("/proc/thread-self/status").map_err(|source| {
            CapabilityError::Read {
                what: "/proc/thread-self/status",
                source,
            }
        })?;
        Self::parse(&status).ok_or_else(|| CapabilityError::Read {
            what: "the Cap lines of /proc/thread-self/status",
            source: io::ErrorKind::InvalidData.into(),
        })
    }

    /// The sets of a /proc/PID/status text (or /proc/PID/task/TID/status).
    pub fn parse(status: &str) -> Option<Self> {
        let set = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .map(CapabilitySet::from_bits)
        };
        Some(Self {
            effective: set("CapEff:")?,
            permitted: set("CapPrm:")?,
            inheritable: set("CapInh:")?,
            bounding: set("CapBnd:")?,
            ambient: set("CapAmb:")?,
        })
    }

    /// Fails unless `caps` are all in the permitted set (what can still be given away).
    pub fn require_permitted(&self, caps: CapabilitySet) -> Result<(), CapabilityError> {
        let missing = caps.difference(self.permitted);
        match missing.is_empty() {
            true => Ok(()),
            false => Err(CapabilityError::NotHeld {
                missing,
                held: self.permitted,
            }),
        }
    }

    /// The first set that differs from `expected`'s, as an error.
    fn check(&self, expected: &Self) -> Result<(), CapabilityError> {
        let pairs = [
            ("effective", self.effective, expected.effective),
            ("permitted", self.permitted, expected.permitted),
            ("inheritable", self.inheritable, expected.inheritable),
            ("bounding", self.bounding, expected.bounding),
            ("ambient", self.ambient, expected.ambient),
        ];
        match pairs.into_iter().find(|(_, found, want)| found != want) {
            Some((set, found, expected)) => Err(CapabilityError::Left {
                set,
                expected,
                found,
            }),
            None => Ok(()),
        }
    }
}

/// Fails unless the calling thread is the only one of the process: what [`drop_all_but`]
/// drops for the whole process only then.
pub fn require_single_thread() -> Result<(), CapabilityError> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|source| CapabilityError::Read {
        what: "/proc/self/task",
        source,
    })?;
    match tasks.count() {
        0 | 1 => Ok(()),
        count => Err(CapabilityError::OtherThreads { others: count - 1 }),
    }
}

/// Drops every capability of the calling thread (and of the threads it starts from now on) but
/// `keep`, from every set: effective and permitted keep `keep` (those of it the thread has),
/// the bounding set keeps `keep`, so that nothing else can be regained; inheritable and ambient
/// are emptied, so that a program the thread executes gets nothing through them. `pass_on`
/// stays in the permitted and bounding sets only, not effective: the thread does not use them,
/// but [`confine_for_exec`] can give them to a program it executes. Needs CAP_SETPCAP (for the
/// bounding set); the sets are read back afterwards, and any difference is an error.
#[doc(alias = "capset")]
#[doc(alias = "PR_CAPBSET_DROP")]
pub fn drop_all_but(
    keep: CapabilitySet,
    pass_on: CapabilitySet,
) -> Result<ThreadCapabilities, CapabilityError> {
    let before = ThreadCapabilities::of_this_thread()?;
    before.require_permitted(pass_on)?;
    let bounding = keep.union(pass_on);
    let wanted = ThreadCapabilities {
        effective: keep.intersection(before.permitted),
        permitted: bounding.intersection(before.permitted),
        inheritable: CapabilitySet::EMPTY,
        bounding: bounding.intersection(before.bounding),
        ambient: CapabilitySet::EMPTY,
    };
    apply(&before, &wanted)?;
    let after = ThreadCapabilities::of_this_thread()?;
    after.check(&wanted)?;
    Ok(after)
}

/// Limits the calling thread to exactly `caps`, in every set, so that a program it executes
/// from now on (or a child it forks executes) runs with exactly `caps` whatever its user: as
/// root, execve gives the permitted and effective sets the bounding and inheritable sets,
/// `caps` both; as another user, the ambient set, `caps` again. A program with file
/// capabilities gets no more either: the bounding set caps them. Needs CAP_SETPCAP, and `caps`
/// in the permitted set (see [`drop_all_but`]'s `pass_on`).
#[doc(alias = "PR_CAP_AMBIENT_RAISE")]
pub fn confine_for_exec(caps: CapabilitySet) -> Result<ThreadCapabilities, CapabilityError> {
    let before = ThreadCapabilities::of_this_thread()?;
    before.require_permitted(caps)?;
    let wanted = ThreadCapabilities {
        effective: caps,
        permitted: caps,
        inheritable: caps,
        bounding: caps,
        ambient: caps,
    };
    apply(&before, &wanted)?;
    let after = ThreadCapabilities::of_this_thread()?;
    after.check(&wanted)?;
    Ok(after)
}

/// Moves the calling thread from `before` to `wanted`, which must only narrow its sets: the
/// bounding set first (while CAP_SETPCAP is still effective), then ambient, inheritable,
/// effective, permitted, and the ambient capabilities last (they need permitted and
/// inheritable).
fn apply(before: &ThreadCapabilities, wanted: &ThreadCapabilities) -> Result<(), CapabilityError> {
    use caps::CapSet;
    for cap in before.bounding.difference(wanted.bounding).named() {
        caps::drop(None, CapSet::Bounding, cap).map_err(|source| CapabilityError::Drop {
            set: "bounding",
            capability: cap.to_string(),
            source,
        })?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|source| CapabilityError::Drop {
        set: "ambient",
        capability: "every capability".into(),
        source,
    })?;
    for (set, name, value) in [
        (CapSet::Inheritable, "inheritable", wanted.inheritable),
        (CapSet::Effective, "effective", wanted.effective),
        (CapSet::Permitted, "permitted", wanted.permitted),
    ] {
        caps::set(None, set, &value.to_hash_set()).map_err(|source| CapabilityError::Set {
            set: name,
            value,
            source,
        })?;
    }
    for cap in wanted.ambient.named() {
        caps::raise(None, CapSet::Ambient, cap).map_err(|source| {
            CapabilityError::RaiseAmbient {
                capability: cap.to_string(),
                source,
            }
        })?;
    }
    Ok(())
}

/// The header and data of capget(2)/capset(2), version 3 (two 32-bit halves of each set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the calling thread's effective, permitted and inheritable sets (and so its ambient
/// set) with one capset(2), allocating nothing: for a forked child of a multi-threaded process,
/// between fork and exit or exec, where only async-signal-safe calls are allowed.
#[doc(alias = "capset")]
pub fn clear_after_fork() -> io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data structs, which live on this stack
    // frame for the whole call; a raw syscall, async-signal-safe.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    match ret {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Capability;

    #[test]
    fn status_lines_are_parsed() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000003000\n\
                      CapEff:\t0000000000001000\nCapBnd:\t000001ffffffffff\n\
                      CapAmb:\t0000000000000000\n";
        let sets = ThreadCapabilities::parse(status).unwrap();
        assert_eq!(sets.effective, CapabilitySet::of(&[Capability::NetAdmin]));
        assert_eq!(sets.permitted.bits(), 0x3000);
        assert_eq!(sets.bounding.bits(), 0x1ff_ffff_ffff);
        assert!(ThreadCapabilities::parse("CapEff:\t0\n").is_none());
    }

    /// The sets of a program the calling thread executes, as it sees them.
    fn sets_of_a_program() -> ThreadCapabilities {
        let output = std::process::Command::new("cat")
            .arg("/proc/self/status")
            .output()
            .unwrap();
        ThreadCapabilities::parse(&String::from_utf8_lossy(&output.stdout)).unwrap()
    }

    #[test]
    fn threads_keep_what_they_are_told_and_programs_get_what_they_are_given() {
        use Capability::{NetAdmin, NetBindService, SetPcap};
        let needed = CapabilitySet::of(&[NetAdmin, NetBindService, SetPcap]);
        let held = ThreadCapabilities::of_this_thread().unwrap().permitted;
        if needed.difference(held) != CapabilitySet::EMPTY {
            eprintln!("skipped: needs {needed} (run as root)");
            return;
        }
        // On a thread of its own: the test's other threads keep theirs.
        std::thread::spawn(move || {
            let (keep, pass_on) = (
                CapabilitySet::of(&[NetAdmin, SetPcap]),
                CapabilitySet::of(&[NetBindService]),
            );
            let kept = drop_all_but(keep, pass_on).unwrap();
            assert_eq!(kept.effective, keep);
            assert_eq!(kept.permitted, keep.union(pass_on));
            assert_eq!(kept.bounding, keep.union(pass_on));
            assert_eq!(kept.inheritable, CapabilitySet::EMPTY);
            // A program gets nothing: the inheritable and ambient sets are empty, and as root
            // it would get the bounding set, so confine first.
            assert_eq!(sets_of_a_program().effective, keep.union(pass_on));
            confine_for_exec(pass_on).unwrap();
            let program = sets_of_a_program();
            assert_eq!(program.effective, pass_on);
            assert_eq!(program.permitted, pass_on);
            assert_eq!(program.bounding, pass_on);
            assert!(matches!(
                confine_for_exec(keep),
                Err(CapabilityError::NotHeld { .. })
            ));
        })
        .join()
        .unwrap();
        std::thread::spawn(move || {
            drop_all_but(CapabilitySet::of(&[SetPcap]), CapabilitySet::EMPTY).unwrap();
            confine_for_exec(CapabilitySet::EMPTY).unwrap();
            let program = sets_of_a_program();
            let none = CapabilitySet::EMPTY;
            assert_eq!(program.effective, none);
            assert_eq!(program.permitted, none);
            assert_eq!(program.bounding, none);
            // Nothing can be regained.
            assert!(matches!(
                drop_all_but(CapabilitySet::of(&[SetPcap]), CapabilitySet::EMPTY),
                Ok(sets) if sets.permitted == none
            ));
        })
        .join()
        .unwrap();
    }
}
