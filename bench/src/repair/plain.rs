//! The reference: what a C programmer writes from docs/tcp-repair.md, one socket after the other
//! on one thread, state into a preallocated array, queue bytes into one preallocated buffer.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use tcpmig::net::Netns;

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
const SIOCINQ: u64 = 0x541B;
const SIOCOUTQ: u64 = 0x5411;
const SIOCOUTQNSD: u64 = 0x894B;
/// Queue bytes one socket may hold in this benchmark.
const MAX_QUEUE: usize = 64;

#[derive(Clone, Copy)]
struct State {
    local: libc::sockaddr_storage,
    remote: libc::sockaddr_storage,
    name_len: libc::socklen_t,
    options: u8,
    wscales: u8,
    mss: i32,
    timestamp: u32,
    send_seq: u32,
    recv_seq: u32,
    outq: i32,
    inq: i32,
    window: [u32; 5],
}

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn set<T>(fd: i32, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` is readable for its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        )
    })
    .map(drop)
}

fn get<T>(fd: i32, level: i32, name: i32, value: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as u32;
    // SAFETY: `value` is writable for its size; plain data.
    check(unsafe { libc::getsockopt(fd, level, name, std::ptr::from_mut(value).cast(), &mut len) })
        .map(drop)
}

fn ioctl(fd: i32, request: u64) -> io::Result<i32> {
    let mut value = 0i32;
    // SAFETY: these ioctls write one int.
    check(unsafe { libc::ioctl(fd, request, &mut value) })?;
    Ok(value)
}

/// Dump (timed), close in repair mode, restore in `netns` (timed); returns the live sockets.
pub fn round(
    netns: &Netns,
    fds: Vec<OwnedFd>,
) -> anyhow::Result<(Duration, Duration, Vec<OwnedFd>)> {
    let n = fds.len();
    // SAFETY: all-zero is a valid State (plain integers and sockaddr_storage).
    let mut states = vec![unsafe { zeroed::<State>() }; n];
    let mut queues = vec![0u8; n * MAX_QUEUE];
    let started = Instant::now();
    for ((fd, state), queue) in fds
        .iter()
        .zip(&mut states)
        .zip(queues.chunks_mut(MAX_QUEUE))
    {
        dump_one(fd.as_raw_fd(), state, queue)?;
    }
    let dump = started.elapsed();
    drop(fds);
    let (restore, fds) = netns.run(|| -> io::Result<(Duration, Vec<OwnedFd>)> {
        let mut fds = Vec::with_capacity(n);
        let started = Instant::now();
        for (state, queue) in states.iter().zip(queues.chunks(MAX_QUEUE)) {
            fds.push(restore_one(state, queue)?);
        }
        Ok((started.elapsed(), fds))
    })??;
    Ok((dump, restore, fds))
}

/// The dump order of docs/tcp-repair.md, peeks skipped for empty queues.
fn dump_one(fd: i32, s: &mut State, queue: &mut [u8]) -> io::Result<()> {
    set(fd, libc::SOL_TCP, TCP_REPAIR, &1i32)?;
    let mut info = [0u8; 8];
    get(fd, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
    (s.options, s.wscales) = (info[5], info[6]);
    s.inq = ioctl(fd, SIOCINQ)?;
    s.outq = ioctl(fd, SIOCOUTQ)?;
    ioctl(fd, SIOCOUTQNSD)?;
    get(fd, libc::SOL_TCP, libc::TCP_MAXSEG, &mut s.mss)?;
    get(fd, libc::SOL_TCP, TCP_TIMESTAMP, &mut s.timestamp)?;
    set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &SEND_QUEUE)?;
    get(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &mut s.send_seq)?;
    assert!(
        s.outq == 0 && s.inq as usize <= queue.len(),
        "idle connections only"
    );
    set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &RECV_QUEUE)?;
    get(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &mut s.recv_seq)?;
    if s.inq > 0 {
        // SAFETY: `queue` is writable for inq bytes.
        check(unsafe {
            libc::recv(
                fd,
                queue.as_mut_ptr().cast(),
                s.inq as usize,
                libc::MSG_PEEK,
            ) as i32
        })?;
    }
    get(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, &mut s.window)?;
    s.name_len = size_of::<libc::sockaddr_storage>() as u32;
    let mut len = s.name_len;
    // SAFETY: the storages are writable for their size.
    unsafe {
        check(libc::getsockname(
            fd,
            std::ptr::from_mut(&mut s.local).cast(),
            &mut s.name_len,
        ))?;
        check(libc::getpeername(
            fd,
            std::ptr::from_mut(&mut s.remote).cast(),
            &mut len,
        ))?;
    }
    Ok(())
}

/// The restore order of docs/tcp-repair.md.
fn restore_one(s: &State, queue: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2), owned at once.
    let fd = check(unsafe {
        libc::socket(
            i32::from(s.local.ss_family),
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: a fresh fd.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set(fd, libc::SOL_TCP, TCP_REPAIR, &1i32)?;
    set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &RECV_QUEUE)?;
    set(
        fd,
        libc::SOL_TCP,
        TCP_QUEUE_SEQ,
        &s.recv_seq.wrapping_sub(s.inq as u32),
    )?;
    set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &SEND_QUEUE)?;
    set(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &s.send_seq)?;
    // SAFETY: the storages hold addresses of `name_len` bytes.
    unsafe {
        check(libc::bind(
            fd,
            std::ptr::from_ref(&s.local).cast(),
            s.name_len,
        ))?;
        check(libc::connect(
            fd,
            std::ptr::from_ref(&s.remote).cast(),
            s.name_len,
        ))?;
    }
    let mut options = [[2u32, s.mss as u32], [0, 0], [0, 0], [0, 0]];
    let mut count = 1;
    if s.options & 4 != 0 {
        options[count] = [
            3,
            u32::from(s.wscales & 0xf) | (u32::from(s.wscales >> 4) << 16),
        ];
        count += 1;
    }
    if s.options & 2 != 0 {
        options[count] = [4, 0];
        count += 1;
    }
    if s.options & 1 != 0 {
        options[count] = [8, 0];
        count += 1;
    }
    // SAFETY: `count` repair options, plain data.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            TCP_REPAIR_OPTIONS,
            options.as_ptr().cast(),
            (count * 8) as u32,
        )
    })?;
    if s.options & 1 != 0 {
        set(fd, libc::SOL_TCP, TCP_TIMESTAMP, &s.timestamp)?;
    }
    if s.inq > 0 {
        set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &RECV_QUEUE)?;
        // SAFETY: `queue` is readable for inq bytes.
        check(unsafe { libc::send(fd, queue.as_ptr().cast(), s.inq as usize, 0) as i32 })?;
    }
    set(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, &s.window)?;
    set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &0i32)?;
    set(fd, libc::SOL_TCP, TCP_REPAIR, &0i32)?;
    Ok(owned)
}
