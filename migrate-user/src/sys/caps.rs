//! Capability checks, so that a command fails up front naming what it lacks instead of with a
//! bare EPERM halfway through; and sets of capabilities by name, which `capset` drops.

use std::{fmt, io, str::FromStr};

/// Capabilities tcpmig needs, by their kernel numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    DacOverride = 1,
    SetPcap = 8,
    NetBindService = 10,
    NetAdmin = 12,
    NetRaw = 13,
    SysAdmin = 21,
    SysPtrace = 19,
    Bpf = 39,
}

impl Capability {
    pub const fn name(self) -> &'static str {
        match self {
            Capability::DacOverride => "CAP_DAC_OVERRIDE",
            Capability::SetPcap => "CAP_SETPCAP",
            Capability::NetBindService => "CAP_NET_BIND_SERVICE",
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::NetRaw => "CAP_NET_RAW",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::Bpf => "CAP_BPF",
        }
    }
}

/// Whether the calling thread has `cap` in its effective set.
pub fn has_capability(cap: Capability) -> bool {
    effective().contains(cap)
}

/// The first capability of `needed` the calling thread lacks. CAP_BPF is also satisfied by
/// CAP_SYS_ADMIN, as in the kernel.
pub fn missing_capability(needed: &[Capability]) -> Option<Capability> {
    let effective = effective();
    needed.iter().copied().find(|&cap| {
        !(effective.contains(cap)
            || (cap == Capability::Bpf && effective.contains(Capability::SysAdmin)))
    })
}

/// The calling thread's effective set; empty if it cannot be read.
fn effective() -> CapabilitySet {
    super::ThreadCapabilities::of_this_thread().map_or(CapabilitySet::EMPTY, |sets| sets.effective)
}

/// A capability this process lacks, found before the first call that would fail with a bare
/// EPERM; every plane's error wraps this one.
#[derive(Debug, thiserror::Error)]
#[error(
    "{operation} needs {} and this process lacks it: run tcpmig as root or grant the capability",
    .capability.name()
)]
pub struct MissingCapability {
    /// What needed it, for instance "`tcpmig migrate`" or "freezing traffic".
    pub operation: &'static str,
    pub capability: Capability,
}

/// Fails with the first capability of `needed` this process lacks.
pub fn require_capabilities(
    operation: &'static str,
    needed: &[Capability],
) -> Result<(), MissingCapability> {
    match missing_capability(needed) {
        Some(capability) => Err(MissingCapability {
            operation,
            capability,
        }),
        None => Ok(()),
    }
}

/// A set of capabilities, bit n for capability n, as /proc/PID/status shows them (`CapEff:`
/// and the others, in hexadecimal).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapabilitySet(u64);

impl CapabilitySet {
    /// No capability.
    pub const EMPTY: Self = Self(0);

    /// The set of `caps`.
    pub fn of(caps: &[Capability]) -> Self {
        Self(caps.iter().fold(0, |bits, &cap| bits | 1 << cap as u64))
    }

    /// The set whose bit n is capability n.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// Bit n is capability n.
    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn contains(self, cap: Capability) -> bool {
        self.0 & 1 << cap as u64 != 0
    }

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// What `self` has and `other` lacks.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// The capabilities of the set that this build knows by name (all of Linux's up to
    /// CAP_CHECKPOINT_RESTORE).
    pub(super) fn named(self) -> impl Iterator<Item = caps::Capability> {
        let mut all: Vec<_> = caps::all().into_iter().collect();
        all.sort_by_key(caps::Capability::index);
        all.into_iter()
            .filter(move |cap| self.0 & cap.bitmask() != 0)
    }

    pub(super) fn to_hash_set(self) -> caps::CapsHashSet {
        self.named().collect()
    }
}

/// `CAP_NET_BIND_SERVICE,CAP_NET_RAW`: the names of the kernel (`none` for the empty set);
/// capabilities this build does not know by name are written by number (`cap_41`).
impl fmt::Display for CapabilitySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut names: Vec<String> = self.named().map(|cap| cap.to_string()).collect();
        let known = self.named().fold(0, |bits, cap| bits | cap.bitmask());
        names.extend(
            (0..64)
                .filter(|n| (self.0 & !known) & 1 << n != 0)
                .map(|n| format!("cap_{n}")),
        );
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for CapabilitySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CapabilitySet({self} = {:#x})", self.0)
    }
}

/// A comma-separated list of names, with or without `CAP_`, in any case:
/// `CAP_NET_BIND_SERVICE,net_raw`; an empty string or `none` is the empty set.
impl FromStr for CapabilitySet {
    type Err = CapabilityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut set = Self::EMPTY;
        for name in text
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            if name.eq_ignore_ascii_case("none") {
                continue;
            }
            let upper = name.to_ascii_uppercase();
            let full = match upper.starts_with("CAP_") {
                true => upper,
                false => format!("CAP_{upper}"),
            };
            let cap = caps::Capability::from_str(&full)
                .map_err(|_| CapabilityError::UnknownName(name.to_owned()))?;
            set.0 |= cap.bitmask();
        }
        Ok(set)
    }
}

/// Dropping capabilities failed, or cannot be done as asked.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error(
        "{0}: not a capability; give names such as CAP_NET_BIND_SERVICE or net_bind_service, \
         separated by commas"
    )]
    UnknownName(String),
    #[error("reading this thread's capabilities ({what})")]
    Read {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("dropping {capability} from this thread's {set} set")]
    Drop {
        set: &'static str,
        capability: String,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("setting this thread's {set} set to {value}")]
    Set {
        set: &'static str,
        value: CapabilitySet,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("raising {capability} in this thread's ambient set")]
    RaiseAmbient {
        capability: String,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("this thread's {set} set is {found} after dropping, not {expected}")]
    Left {
        set: &'static str,
        expected: CapabilitySet,
        found: CapabilitySet,
    },
    #[error(
        "{missing}: this process does not hold it (permitted set), so it cannot pass it on; run \
         tcpmig as root or grant it"
    )]
    NotHeld {
        missing: CapabilitySet,
        held: CapabilitySet,
    },
    #[error(
        "{others} other threads run in this process and would keep their capabilities (they \
         belong to threads): drop them before starting threads"
    )]
    OtherThreads { others: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_with_or_without_cap_in_any_case() {
        let set: CapabilitySet = "CAP_NET_BIND_SERVICE, net_raw,Sys_Admin".parse().unwrap();
        let want = CapabilitySet::of(&[
            Capability::NetBindService,
            Capability::NetRaw,
            Capability::SysAdmin,
        ]);
        assert_eq!(set, want);
        assert_eq!(
            set.to_string(),
            "CAP_NET_BIND_SERVICE,CAP_NET_RAW,CAP_SYS_ADMIN"
        );
        assert_eq!("".parse::<CapabilitySet>().unwrap(), CapabilitySet::EMPTY);
        assert_eq!("none".parse::<CapabilitySet>().unwrap().to_string(), "none");
        assert!(matches!(
            "net_bind".parse::<CapabilitySet>(),
            Err(CapabilityError::UnknownName(name)) if name == "net_bind"
        ));
    }

    #[test]
    fn unknown_bits_are_written_by_number() {
        let set = CapabilitySet::from_bits(1 << 12 | 1 << 63);
        assert_eq!(set.to_string(), "CAP_NET_ADMIN,cap_63");
    }
}
