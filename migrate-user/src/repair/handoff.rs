//! Handing restored connections to the application that serves them (design.md, "Handing
//! sockets to the destination application").
//!
//! # Exec: socket activation
//! [`exec_with_fds`] replaces the calling process by a command (like `exec` in a shell, or
//! systemd-socket-activate): the command keeps tcpmig's pid, so a supervisor (systemd, a
//! container runtime, a test) that started `tcpmig restore --exec` now supervises the
//! application, its exit status is the command's, and `LISTEN_PID` is simply that pid. The
//! connections are fds 3, 4, ... with `LISTEN_FDS=<count>`, `LISTEN_PID=<pid>` and
//! `LISTEN_FDNAMES` (one name per fd, `:`-separated: the [`fd_name`] of each connection, or
//! `connection` for all of them, systemd's name with `Accept=yes`, when the names together pass
//! the kernel's 128 KiB limit on one environment string, from about 3,500 connections on; left
//! out from 11,915 connections on, where even those pass it). Every other fd of tcpmig is
//! close-on-exec.
//!
//! # Several processes
//! More connections than one process can hold (its fd limit, see [`max_fds_per_process`]) are
//! handed to several: [`spawn_with_fds`] starts the command once per group of connections, with
//! the same variables as above, LISTEN_PID being the child's own pid, plus `TCPMIG_SHARD` (its
//! group, from 0) and `TCPMIG_SHARDS` (how many). The children share tcpmig's stdin, stdout and
//! stderr, and get SIGTERM when the thread that started them ends; [`wait_all`] waits for them.
//!
//! # Unix socket: SCM_RIGHTS
//! [`send_fds`] connects to a Unix socket (SOCK_SEQPACKET if the listener is one, else
//! SOCK_STREAM) and sends the connections in messages of at most [`MAX_FDS_PER_MESSAGE`] fds.
//! Each message's bytes are a header line `tcpmig-fds <n>\n` and then `n` lines, one
//! [`fd_name`] per line, the k-th name for the k-th fd of the message's SCM_RIGHTS. tcpmig then
//! shuts down its side and waits (up to [`RECEIVER_TIMEOUT`]) for the receiver to close the
//! connection, which says it holds the fds. Receivers read with recvmsg and room for 253 fds from
//! the first byte on (a plain read() discards fds); on SOCK_STREAM one recvmsg returns at most
//! one message's fds, so read lines until `n` names arrived. Python:
//! `data, fds, _, _ = socket.recv_fds(conn, 65536, 253)`.
use std::{
    convert::Infallible,
    ffi::{CString, OsStr, OsString},
    io::{self, Read as _},
    mem::size_of_val,
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, IntoRawFd, OwnedFd, RawFd},
        unix::{
            ffi::OsStrExt as _, fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use super::RestoredSocket;
use crate::{net::NetnsError, tuple::Tuple};

/// Most fds one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// How long [`send_fds`] waits for the receiver to close the connection.
pub const RECEIVER_TIMEOUT: Duration = Duration::from_secs(30);
const LISTEN_FDS_START: RawFd = 3;
/// MAX_ARG_STRLEN: the longest single argument or environment string execve accepts.
const MAX_ENV_STRING: usize = 32 * 4096;
/// Fds the command needs besides the connections (stdio, libraries, its own files).
const SPARE_FDS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("--exec needs a command")]
    EmptyCommand,
    #[error("{program}: not found or not executable (looked in {looked}); nothing was restored")]
    NotExecutable { program: String, looked: String },
    #[error(
        "{count} connections need {count} fds plus {SPARE_FDS} spare, above this process's hard \
         limit of {limit} open files: split the migration or raise the limit (ulimit -Hn)"
    )]
    TooManyFds { count: usize, limit: u64 },
    #[error("connecting to the receiver's Unix socket {path}; is the receiver listening?")]
    Connect { path: PathBuf, source: io::Error },
    #[error("handing the connections over: {what}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> HandoffError {
    let what = what.into();
    move |source| HandoffError::Io { what, source }
}

/// The name of a connection in LISTEN_FDNAMES and in the Unix socket protocol:
/// `LOCALIP.PORT-REMOTEIP.PORT` as tcpdump writes it, with the colons of IPv6 addresses written
/// `_` (LISTEN_FDNAMES separates names with colons).
pub fn fd_name(tuple: &Tuple) -> String {
    let end = |addr: SocketAddr| format!("{}.{}", addr.ip(), addr.port()).replace(':', "_");
    format!("{}-{}", end(tuple.local), end(tuple.remote))
}

/// A command checked before anything is restored: a missing program must not cost the
/// connections.
#[derive(Debug)]
pub struct ExecCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl ExecCommand {
    /// Resolves `command[0]` (through PATH when it has no `/`) and checks that this process can
    /// hold `connections` fds for it.
    pub fn prepare(command: &[OsString], connections: usize) -> Result<Self, HandoffError> {
        let (program, args) = command.split_first().ok_or(HandoffError::EmptyCommand)?;
        let limit = raise_nofile_limit().map_err(io_error("raising RLIMIT_NOFILE"))?;
        if connections > room_under(limit) {
            return Err(HandoffError::TooManyFds {
                count: connections,
                limit,
            });
        }
        Ok(Self {
            program: resolve(program)?,
            args: args.to_vec(),
        })
    }
}

fn resolve(program: &OsStr) -> Result<PathBuf, HandoffError> {
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let found = if program.as_bytes().contains(&b'/') {
        Some(PathBuf::from(program)).filter(|p| executable(p))
    } else {
        std::env::split_paths(&path_var)
            .map(|dir| dir.join(program))
            .find(|p| executable(p))
    };
    found.ok_or_else(|| HandoffError::NotExecutable {
        program: program.to_string_lossy().into_owned(),
        looked: if program.as_bytes().contains(&b'/') {
            "that path".to_owned()
        } else {
            format!("PATH={}", path_var.to_string_lossy())
        },
    })
}

/// Most connections one process can be handed: its hard fd limit less stdio and the spare fds
/// it needs for itself.
pub fn max_fds_per_process() -> io::Result<usize> {
    Ok(room_under(raise_nofile_limit()?))
}

/// Connections a command can be handed under an fd limit of `limit`.
fn room_under(limit: u64) -> usize {
    limit.saturating_sub(LISTEN_FDS_START as u64 + SPARE_FDS) as usize
}

/// Replaces this process by `command` with `sockets` as fds 3, 4, ... and LISTEN_FDS,
/// LISTEN_PID and LISTEN_FDNAMES set (see the module docs). The calling thread must be in the
/// namespace the command should run in. Returns only on error.
pub fn exec_with_fds(
    sockets: Vec<RestoredSocket>,
    command: ExecCommand,
) -> Result<Infallible, HandoffError> {
    let names = listen_fdnames(&sockets);
    let count = sockets.len();
    place_fds(sockets.into_iter().map(|s| s.fd).collect())
        .map_err(io_error("moving the connections to fds 3.."))?;
    let mut exec = std::process::Command::new(&command.program);
    exec.args(&command.args)
        .env("LISTEN_FDS", count.to_string())
        .env("LISTEN_PID", std::process::id().to_string());
    match names {
        Some(names) => exec.env("LISTEN_FDNAMES", names),
        None => exec.env_remove("LISTEN_FDNAMES"),
    };
    let error = exec.exec();
    Err(io_error(format!("executing {}", command.program.display()))(error))
}

/// Starts `command` with `sockets` as fds 3, 4, ... and the variables of socket activation
/// (LISTEN_PID is the child's pid, written between fork and exec), plus `env`; see the module
/// docs. The child inherits the calling thread's fd table and namespace, and gets SIGTERM when
/// that thread ends. The sockets are closed here once the child has them.
pub fn spawn_with_fds(
    sockets: Vec<RestoredSocket>,
    command: &ExecCommand,
    env: &[(&str, String)],
) -> Result<Child, HandoffError> {
    let count = sockets.len();
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| !name.as_bytes().starts_with(b"LISTEN_"))
        .collect();
    vars.push(("LISTEN_FDS".into(), count.to_string().into()));
    if let Some(names) = listen_fdnames(&sockets) {
        vars.push(("LISTEN_FDNAMES".into(), names.into()));
    }
    vars.extend(env.iter().map(|(name, value)| (name.into(), value.into())));
    let mut exec = Execve::new(command, &vars)
        .map_err(|e| io_error(format!("preparing {}", command.program.display()))(e))?;
    place_fds(sockets.into_iter().map(|s| s.fd).collect())
        .map_err(io_error("moving the connections to fds 3.."))?;
    // SAFETY: getpid, prctl, getppid and execve are async-signal-safe, and Execve::run
    // allocates nothing: it only writes digits into a buffer made beforehand.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(&command.program);
    // SAFETY: as above: the hook runs only async-signal-safe calls on memory made before fork.
    unsafe { cmd.pre_exec(move || exec.run(parent)) };
    let spawned = cmd.spawn();
    // The child has its copies (or failed): ours, at 3.., are closed.
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count as RawFd {
        // SAFETY: these numbers hold the sockets placed above, which nothing else owns.
        unsafe { libc::close(fd) };
    }
    spawned.map_err(io_error(format!("starting {}", command.program.display())))
}

/// Waits for every child and returns the first unsuccessful exit status, or success.
pub fn wait_all(children: Vec<Child>) -> Result<ExitStatus, HandoffError> {
    let (mut first_failure, mut last) = (None, None);
    for mut child in children {
        let exited = child
            .wait()
            .map_err(io_error(format!("waiting for process {}", child.id())))?;
        if !exited.success() {
            first_failure.get_or_insert(exited);
        }
        last = Some(exited);
    }
    first_failure
        .or(last)
        .ok_or_else(|| io_error("waiting for the processes")(io::Error::other("none started")))
}

/// An execve(2) prepared before fork: the child only writes its pid into LISTEN_PID's buffer.
struct Execve {
    program: CString,
    /// Keeps the strings the pointers point into.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` and room for the digits and the NUL.
    listen_pid: Box<[u8; 32]>,
}

// SAFETY: the pointers point into the strings and buffer the struct owns, which nothing else
// touches; it is used once, in the forked child.
unsafe impl Send for Execve {}
// SAFETY: as for Send: shared references only read the owned strings and buffer.
unsafe impl Sync for Execve {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl Execve {
    fn new(command: &ExecCommand, vars: &[(OsString, OsString)]) -> io::Result<Self> {
        let c_string = |bytes: Vec<u8>| {
            CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL"))
        };
        let program = c_string(command.program.as_os_str().as_bytes().to_vec())?;
        let mut strings = vec![program.clone()];
        for arg in &command.args {
            strings.push(c_string(arg.as_bytes().to_vec())?);
        }
        let argc = strings.len();
        for (name, value) in vars {
            let mut var = name.as_bytes().to_vec();
            var.push(b'=');
            var.extend_from_slice(value.as_bytes());
            strings.push(c_string(var)?);
        }
        let mut listen_pid = Box::new([0u8; 32]);
        listen_pid[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
        let pointers = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings.iter().map(|s| s.as_ptr()).collect()
        };
        let mut argv = pointers(&strings[..argc]);
        argv.push(std::ptr::null());
        let mut envp = pointers(&strings[argc..]);
        envp.push(listen_pid.as_ptr().cast());
        envp.push(std::ptr::null());
        Ok(Self {
            program,
            _strings: strings,
            argv,
            envp,
            listen_pid,
        })
    }

    /// In the child: LISTEN_PID, death signal, execve. Returns only on error.
    fn run(&mut self, parent: libc::pid_t) -> io::Result<()> {
        // SAFETY: async-signal-safe calls with valid arguments; the arrays end with NULL.
        unsafe {
            write_decimal(
                &mut self.listen_pid[LISTEN_PID_PREFIX.len()..],
                libc::getpid() as u32,
            );
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The thread that started us may have ended before the death signal was set.
            if libc::getppid() != parent {
                return Err(io::Error::other("tcpmig ended while starting the command"));
            }
            libc::execve(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
        }
        Err(io::Error::last_os_error())
    }
}

/// Writes `value` in decimal and a NUL into `buffer` (at least 11 bytes), allocating nothing.
fn write_decimal(buffer: &mut [u8], mut value: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        len += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for (i, digit) in digits[..len].iter().rev().enumerate() {
        buffer[i] = *digit;
    }
    buffer[len] = 0;
}

/// The connections' names, or `connection` for each, whichever fits in one environment string;
/// None when neither does (execve would fail with E2BIG).
fn listen_fdnames(sockets: &[RestoredSocket]) -> Option<String> {
    fdnames(sockets.iter().map(|s| &s.tuple).collect())
}

fn fdnames(tuples: Vec<&Tuple>) -> Option<String> {
    let fits = |joined: &String| "LISTEN_FDNAMES=".len() + joined.len() < MAX_ENV_STRING;
    let names: Vec<String> = tuples.iter().map(|tuple| fd_name(tuple)).collect();
    Some(names.join(":"))
        .filter(fits)
        .or_else(|| Some(vec!["connection"; tuples.len()].join(":")).filter(fits))
}

/// Raises the soft RLIMIT_NOFILE to the hard one (no capability needed) and returns it: a bulk
/// restore or dump holds one fd per connection.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit out- and in-pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// Puts fd i at 3 + i without close-on-exec, closing its old number. Sockets sitting on each
/// other's targets form chains (i's target holds j, j's holds k, ...) that end at a number no
/// socket holds, or come back to i: a chain is placed from its end, a cycle after moving i to a
/// spare number. So at most one fd more than the sockets is ever open, whatever their order:
/// 19,933 fit under a 20,000 limit. Whatever else sits in the range is close-on-exec and simply
/// replaced.
fn place_fds(fds: Vec<OwnedFd>) -> io::Result<()> {
    let end = LISTEN_FDS_START + fds.len() as RawFd;
    let slot = |fd: RawFd| {
        (LISTEN_FDS_START..end)
            .contains(&fd)
            .then(|| (fd - LISTEN_FDS_START) as usize)
    };
    let target = |index: usize| LISTEN_FDS_START + index as RawFd;
    // The fds leave Rust's ownership here: after exec they are the command's.
    let mut at: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    // The socket on each target number, while it is not yet placed.
    let mut occupant = vec![None; at.len()];
    for (index, &fd) in at.iter().enumerate() {
        if let Some(s) = slot(fd) {
            occupant[s] = Some(index);
        }
    }
    let mut placed = vec![false; at.len()];
    let mut chain = Vec::new();
    for first in 0..at.len() {
        if placed[first] {
            continue;
        }
        if at[first] == target(first) {
            // SAFETY: F_SETFD on an fd we hold.
            check(unsafe { libc::fcntl(at[first], libc::F_SETFD, 0) })?;
            placed[first] = true;
            occupant[first] = None;
            continue;
        }
        chain.clear();
        chain.push(first);
        // The socket on the last one's target; the walk ends within all of them (each socket
        // sits on one number, so it can only come back to `first`).
        while let Some(next) = occupant[*chain.last().expect("never empty")] {
            if next == first {
                // SAFETY: duplicating an fd we hold, then closing its old number.
                let spare = check(unsafe { libc::fcntl(at[first], libc::F_DUPFD_CLOEXEC, end) })?;
                // SAFETY: the old number of a socket we hold, now duplicated to `spare`.
                unsafe { libc::close(at[first]) };
                occupant[slot(at[first]).expect("a cycle is inside the range")] = None;
                at[first] = spare;
                break;
            }
            chain.push(next);
        }
        for &index in chain.iter().rev() {
            // SAFETY: dup2 and close on fds we hold; the target holds nothing still needed.
            unsafe {
                check(libc::dup2(at[index], target(index)))?;
                libc::close(at[index]);
            }
            if let Some(s) = slot(at[index]) {
                occupant[s] = None;
            }
            at[index] = target(index);
            placed[index] = true;
        }
    }
    Ok(())
}

/// Sends `sockets` to the receiver at `path` (see the module docs) and waits for it to close the
/// connection. The receiver holds its own copies then; the caller's can be closed.
pub fn send_fds(sockets: &[RestoredSocket], path: &Path) -> Result<(), HandoffError> {
    let stream = connect_unix(path)?;
    let fd = stream.as_raw_fd();
    let what = || format!("sending to {}", path.display());
    for batch in sockets.chunks(MAX_FDS_PER_MESSAGE) {
        let mut text = format!("tcpmig-fds {}\n", batch.len());
        for socket in batch {
            text.push_str(&fd_name(&socket.tuple));
            text.push('\n');
        }
        let fds: Vec<RawFd> = batch.iter().map(|s| s.fd.as_raw_fd()).collect();
        send_with_fds(fd, text.as_bytes(), &fds).map_err(io_error(what()))?;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(io_error(what()))?;
    stream
        .set_read_timeout(Some(RECEIVER_TIMEOUT))
        .map_err(io_error(what()))?;
    let mut sink = [0u8; 256];
    loop {
        match (&stream).read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io_error(format!(
                    "waiting for the receiver at {} to close the connection",
                    path.display()
                ))(e));
            }
        }
    }
}

/// SOCK_SEQPACKET if the listener is one, SOCK_STREAM otherwise.
fn connect_unix(path: &Path) -> Result<UnixStream, HandoffError> {
    let connect_error = |source| HandoffError::Connect {
        path: path.to_owned(),
        source,
    };
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(connect_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a valid Unix socket path (at most 107 bytes, no NUL)",
        )));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let mut last = io::Error::from(io::ErrorKind::InvalidInput);
    for kind in [libc::SOCK_SEQPACKET, libc::SOCK_STREAM] {
        // SAFETY: socket(2); owned at once.
        let raw = check(unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) })
            .map_err(connect_error)?;
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: connect(2) with a valid sockaddr_un and its size.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of_val(&addr) as libc::socklen_t,
            )
        };
        if ret == 0 {
            // Both kinds take read/shutdown the same way.
            return Ok(UnixStream::from(fd));
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EPROTOTYPE) {
            break;
        }
    }
    Err(connect_error(last))
}

/// One sendmsg with `fds` attached to `data`; on a stream socket the kernel may take part of the
/// bytes, the rest follows without fds.
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let payload = size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers outlive the call and the control buffer has
    // room for one cmsghdr carrying `fds`.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rest = &data[sent as usize..];
    while !rest.is_empty() {
        // SAFETY: `rest` is readable for its length.
        let sent =
            unsafe { libc::send(socket, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        rest = &rest[sent as usize..];
    }
    Ok(())
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_no_colons() {
        let tuple = Tuple {
            local: "[fd54:636d::100]:80".parse().unwrap(),
            remote: "198.18.0.1:40000".parse().unwrap(),
        };
        assert_eq!(fd_name(&tuple), "fd54_636d__100.80-198.18.0.1.40000");
    }

    #[test]
    fn names_fall_back_to_connection_then_to_none() {
        let tuples: Vec<Tuple> = (0..12_000)
            .map(|k| Tuple {
                local: "198.18.0.100:80".parse().unwrap(),
                remote: SocketAddr::from(([198, 18, 0, 1], 1024 + k as u16)),
            })
            .collect();
        for (n, expected) in [(100, Some(false)), (5_000, Some(true)), (12_000, None)] {
            let names = fdnames(tuples[..n].iter().collect());
            assert_eq!(
                names.map(|names| names.starts_with("connection:")),
                expected,
                "{n} connections"
            );
        }
    }

    /// In a shard, whose fd table is its own: fds 3.. are only copies of the test harness's.
    #[test]
    fn fds_in_any_order_are_placed_with_one_spare_number() {
        use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
        let shard: crate::shard::Shard<()> = crate::shard::Shard::spawn("place".into()).unwrap();
        let checked = shard.run(|_| -> io::Result<usize> {
            let n = max_fds_per_process()?;
            let mut fds: Vec<OwnedFd> = (0..n)
                .map(|_| {
                    // SAFETY: socket(2); owned at once.
                    let fd = check(unsafe {
                        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                    })?;
                    // SAFETY: a fresh fd.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                })
                .collect::<io::Result<_>>()?;
            // Reversed and rotated: chains, cycles and sockets already in place.
            fds.reverse();
            fds.rotate_left(n / 3);
            let inode = |fd: RawFd| {
                std::fs::metadata(format!("/proc/thread-self/fd/{fd}")).map(|m| m.ino())
            };
            let wanted = fds
                .iter()
                .map(|fd| inode(fd.as_raw_fd()))
                .collect::<io::Result<Vec<_>>>()?;
            place_fds(fds)?;
            for (i, wanted) in wanted.iter().enumerate() {
                let fd = LISTEN_FDS_START + i as RawFd;
                assert_eq!(inode(fd)?, *wanted, "fd {fd}");
                // SAFETY: F_GETFD on an open fd.
                assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFD) }, 0, "fd {fd}");
                // SAFETY: closing what place_fds left for an exec.
                unsafe { libc::close(fd) };
            }
            Ok(wanted.len())
        });
        assert!(checked.unwrap() > 10_000);
    }

    #[test]
    fn decimals_are_written_with_a_nul() {
        let mut buffer = [b'x'; 12];
        write_decimal(&mut buffer, 0);
        assert_eq!(&buffer[..2], b"0\0");
        write_decimal(&mut buffer, 4_294_967_295);
        assert_eq!(&buffer[..11], b"4294967295\0");
    }

    #[test]
    fn missing_programs_are_refused_before_anything_happens() {
        let error = ExecCommand::prepare(&["tcpmig-no-such-program".into()], 1).unwrap_err();
        assert!(
            matches!(error, HandoffError::NotExecutable { .. }),
            "{error}"
        );
        assert!(matches!(
            ExecCommand::prepare(&[], 1),
            Err(HandoffError::EmptyCommand)
        ));
    }
}
