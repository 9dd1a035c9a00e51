//! Scheduling: clean-up nobody waits for gives the CPUs to work someone waits for.
use std::io;

/// Puts thread `tid` (0: the calling thread) in SCHED_IDLE: it runs only on a CPU that has
/// nothing else to run.
pub fn idle_priority(tid: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param, which the call only reads.
    match unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Every thread of process `pid` in SCHED_IDLE (one that exits meanwhile is no error).
pub fn idle_priority_process(pid: u32) -> io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        match idle_priority(tid) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
