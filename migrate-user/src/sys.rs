//! The few kernel calls aya does not offer: batched map updates, BPF_PROG_TEST_RUN, capability
//! checks and the clock the eBPF programs read.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _},
    time::Duration,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` for BPF_MAP_*_BATCH (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_LINK_DETACH.
#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Returns the syscall's non-negative result (an fd for BPF_OBJ_GET).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly laid out bpf_attr variant of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Detaches a bpf link now (BPF_LINK_DETACH), pinned at `path`. Unpinning alone lets the kernel
/// release the link later, on a workqueue: the program would stay attached for a moment.
pub fn detach_pinned_link(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that we own.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut detach = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut detach).map(drop)
}

/// Inserts or replaces all `keys[i] -> values[i]`, in as few syscalls as the kernel allows.
pub fn map_update_batch<K, V>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    batch(BPF_MAP_UPDATE_BATCH, map, keys, Some(values), false)
}

/// Deletes all `keys`; keys that are not present are skipped.
pub fn map_delete_batch<K>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    batch::<K, ()>(BPF_MAP_DELETE_BATCH, map, keys, None, true)
}

/// Runs a batch command over `keys` (and `values`). The kernel may stop early, saying how far it
/// got in `count`: the loop resumes there. A missing key stops a delete batch at that key, so
/// with `skip_missing` the loop steps over it.
fn batch<K, V>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
    skip_missing: bool,
) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values.map_or(0, |values| values[done..].as_ptr() as u64),
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(cmd, &mut attr).map(drop);
        done += attr.count as usize;
        match result {
            Ok(()) if attr.count > 0 => {}
            Ok(()) => return Err(io::Error::other("bpf map batch made no progress")),
            Err(e) if skip_missing && e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs a loaded program once on `packet` (BPF_PROG_TEST_RUN) and returns its verdict.
pub fn prog_test_run(prog: BorrowedFd<'_>, packet: &[u8]) -> io::Result<u32> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_in: packet.as_ptr() as u64,
        data_size_in: u32::try_from(packet.len()).map_err(io::Error::other)?,
        data_out: out.as_mut_ptr() as u64,
        data_size_out: u32::try_from(out.len()).map_err(io::Error::other)?,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval)
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns(): deadlines in the maps are on it.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

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

/// Blocks until SIGINT or SIGTERM arrives or `timeout` passes; returns whether a signal came.
/// The signals are blocked first, so they are taken here instead of killing the process.
pub fn wait_for_termination(timeout: Duration) -> io::Result<bool> {
    // SAFETY: sigset operations on a local, zero-initialised set; sigtimedwait with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            if libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) >= 0 {
                return Ok(true);
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(false),
                Some(libc::EINTR) => continue,
                _ => return Err(error),
            }
        }
    }
}
