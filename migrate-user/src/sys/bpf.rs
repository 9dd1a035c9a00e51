//! The bpf(2) commands aya 0.16 does not offer: batched map updates and deletes (one syscall for
//! thousands of 4-tuples), BPF_PROG_TEST_RUN, and detaching a pinned link at once.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _},
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
