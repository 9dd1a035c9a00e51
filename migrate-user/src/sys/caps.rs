//! Capability checks, so that a command fails up front naming what it lacks instead of with a
//! bare EPERM halfway through.

/// Capabilities tcpmig needs, by their kernel numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    NetAdmin = 12,
    SysAdmin = 21,
    SysPtrace = 19,
    Bpf = 39,
}

impl Capability {
    pub const fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::Bpf => "CAP_BPF",
        }
    }
}

/// Whether this process has `cap` in its effective set (from /proc/self/status).
pub fn has_capability(cap: Capability) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << cap as u64) != 0)
}

/// The first capability of `needed` this process lacks. CAP_BPF is also satisfied by
/// CAP_SYS_ADMIN, as in the kernel.
pub fn missing_capability(needed: &[Capability]) -> Option<Capability> {
    needed.iter().copied().find(|&cap| {
        !(has_capability(cap) || (cap == Capability::Bpf && has_capability(Capability::SysAdmin)))
    })
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
