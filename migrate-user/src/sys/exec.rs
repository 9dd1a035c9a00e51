//! Starting a command whose environment names its own pid (socket activation's LISTEN_PID):
//! between fork and exec only async-signal-safe calls are allowed, so the execve(2) is prepared
//! beforehand and the child only writes its pid into it.
use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::Path,
    process::{Child, Command},
};

use super::PlacedFds;

/// An execve(2) prepared before fork: the child only writes its pid into the buffer of the
/// variable that holds it.
pub struct Execve {
    program: CString,
    /// Keeps the strings the pointers point into.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `NAME=` and room for the digits and the NUL.
    pid_var: Box<[u8]>,
    /// Where the digits go in `pid_var`.
    digits_at: usize,
}

// SAFETY: the pointers point into the strings and buffer the struct owns, which nothing else
// touches; it is used once, in the forked child.
unsafe impl Send for Execve {}
// SAFETY: as for Send: no method reads or writes through the pointers from a shared reference
// (pre_exec only asks for Sync of the closure that owns it; `run` takes `&mut self`).
unsafe impl Sync for Execve {}

impl Execve {
    /// Prepares `program` with `args` and the environment `vars` plus `pid_var`, whose value the
    /// child sets to its own pid.
    pub fn new(
        program: &Path,
        args: &[OsString],
        vars: &[(OsString, OsString)],
        pid_var: &str,
    ) -> io::Result<Self> {
        let c_string = |bytes: Vec<u8>| {
            CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL"))
        };
        let program = c_string(program.as_os_str().as_bytes().to_vec())?;
        let mut strings = vec![program.clone()];
        for arg in args {
            strings.push(c_string(arg.as_bytes().to_vec())?);
        }
        let argc = strings.len();
        for (name, value) in vars {
            let mut var = name.as_bytes().to_vec();
            var.push(b'=');
            var.extend_from_slice(value.as_bytes());
            strings.push(c_string(var)?);
        }
        let digits_at = pid_var.len() + 1;
        // Room for a u32's ten digits and the NUL.
        let mut pid_var_buffer = vec![0u8; digits_at + 11].into_boxed_slice();
        pid_var_buffer[..pid_var.len()].copy_from_slice(pid_var.as_bytes());
        pid_var_buffer[pid_var.len()] = b'=';
        let pointers = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings.iter().map(|s| s.as_ptr()).collect()
        };
        let mut argv = pointers(&strings[..argc]);
        argv.push(std::ptr::null());
        let mut envp = pointers(&strings[argc..]);
        envp.push(pid_var_buffer.as_ptr().cast());
        envp.push(std::ptr::null());
        Ok(Self {
            program,
            _strings: strings,
            argv,
            envp,
            pid_var: pid_var_buffer,
            digits_at,
        })
    }

    /// In the child: its pid, death signal, execve. Returns only on error.
    fn run(&mut self, parent: libc::pid_t) -> io::Result<()> {
        // SAFETY: async-signal-safe calls with valid arguments; the arrays end with NULL.
        unsafe {
            write_decimal(&mut self.pid_var[self.digits_at..], libc::getpid() as u32);
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

/// Starts `exec` with the fds `placed`, which the child inherits; it gets SIGTERM when the
/// calling thread ends. This process's copies of the placed fds are closed once the child has
/// them (or failed to start).
#[doc(alias = "execve")]
pub fn spawn_execve(mut exec: Execve, placed: PlacedFds) -> io::Result<Child> {
    let parent = nix::unistd::getpid().as_raw();
    let mut cmd = Command::new(OsStr::from_bytes(exec.program.as_bytes()));
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
    // allowed: Execve::run makes only getpid, prctl, getppid and execve, and allocates nothing
    // (it writes digits into a buffer made beforehand).
    unsafe { cmd.pre_exec(move || exec.run(parent)) };
    let spawned = cmd.spawn();
    placed.close();
    spawned
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_with_a_nul() {
        let mut buffer = [b'x'; 12];
        write_decimal(&mut buffer, 0);
        assert_eq!(&buffer[..2], b"0\0");
        write_decimal(&mut buffer, 4_294_967_295);
        assert_eq!(&buffer[..11], b"4294967295\0");
    }
}
