//! Socket activation: the connections as fds 3, 4, ... of a command this process becomes, or
//! of children it starts (see the module docs of [`crate::handoff`]).
use std::{
    convert::Infallible,
    ffi::{CString, OsString},
    io,
    os::{
        fd::{IntoRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, process::CommandExt as _},
    },
    process::{Child, Command, ExitStatus},
};

use super::{ExecCommand, HandoffError, LISTEN_FDS_START, check, listen_fdnames};
use crate::repair::RestoredSocket;

/// Replaces this process by `command` with `sockets` as fds 3, 4, ... and LISTEN_FDS,
/// LISTEN_PID and LISTEN_FDNAMES set (see the module docs). The calling thread must be in the
/// namespace the command should run in. Returns only on error.
///
/// # Examples
/// `tcpmig restore --exec -- my-server` in a few lines:
/// ```no_run
/// use std::{ffi::OsString, path::Path};
///
/// use tcpmig::{
///     handoff::{self, ExecCommand},
///     image,
///     net::Netns,
///     repair,
/// };
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = image::read_file(Path::new("connections.img"))?;
/// // Checked before anything is restored: a missing program must not cost the connections.
/// let command = ExecCommand::prepare(&[OsString::from("my-server")], connections.len())?;
/// let committed = repair::restore(&Netns::current()?, &connections)?.commit();
/// match handoff::exec_with_fds(committed.sockets, command)? {}
/// # }
/// ```
pub fn exec_with_fds(
    sockets: Vec<RestoredSocket>,
    command: ExecCommand,
) -> Result<Infallible, HandoffError> {
    let names = listen_fdnames(&sockets);
    let count = sockets.len();
    place_fds(sockets.into_iter().map(|s| s.fd).collect()).map_err(HandoffError::PlaceFds)?;
    let mut exec = std::process::Command::new(&command.program);
    exec.args(&command.args)
        .env("LISTEN_FDS", count.to_string())
        .env("LISTEN_PID", std::process::id().to_string());
    match names {
        Some(names) => exec.env("LISTEN_FDNAMES", names),
        None => exec.env_remove("LISTEN_FDNAMES"),
    };
    let error = exec.exec();
    Err(HandoffError::Exec {
        program: command.program,
        source: error,
    })
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
    let mut exec = Execve::new(command, &vars).map_err(|source| HandoffError::Prepare {
        program: command.program.clone(),
        source,
    })?;
    place_fds(sockets.into_iter().map(|s| s.fd).collect()).map_err(HandoffError::PlaceFds)?;
    // SAFETY: getpid(2) has no preconditions and cannot fail.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(&command.program);
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
    // allowed: Execve::run makes only getpid, prctl, getppid and execve, and allocates nothing
    // (it writes digits into a buffer made beforehand).
    unsafe { cmd.pre_exec(move || exec.run(parent)) };
    let spawned = cmd.spawn();
    // The child has its copies (or failed): ours, at 3.., are closed.
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count as RawFd {
        // SAFETY: these numbers hold the sockets placed above, which nothing else owns.
        unsafe { libc::close(fd) };
    }
    spawned.map_err(|source| HandoffError::Spawn {
        program: command.program.clone(),
        source,
    })
}

/// Waits for every child and returns the first unsuccessful exit status, or success.
pub fn wait_all(children: Vec<Child>) -> Result<ExitStatus, HandoffError> {
    let (mut first_failure, mut last) = (None, None);
    for mut child in children {
        let exited = child.wait().map_err(|source| HandoffError::Wait {
            pid: child.id(),
            source,
        })?;
        if !exited.success() {
            first_failure.get_or_insert(exited);
        }
        last = Some(exited);
    }
    first_failure.or(last).ok_or(HandoffError::NoneStarted)
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
// SAFETY: as for Send: no method reads or writes through the pointers from a shared reference
// (pre_exec only asks for Sync of the closure that owns it; `run` takes `&mut self`).
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
                // SAFETY: duplicating an fd we hold.
                let spare = check(unsafe { libc::fcntl(at[first], libc::F_DUPFD_CLOEXEC, end) })?;
                // SAFETY: closing its old number, which we hold and nothing else uses.
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

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd as _;

    use super::*;
    use crate::handoff::max_fds_per_process;

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
}
