//! Threads with an fd table of their own.
//!
//! RLIMIT_NOFILE bounds each fd table, not the process: its hard limit is 20,000 here and only
//! CAP_SYS_RESOURCE raises it, while a migration of 50,000 connections holds 50,000 sockets. So
//! tcpmig spreads them over shards: threads that unshare(CLONE_FILES) when they start and keep
//! their sockets in their own table.
//!
//! A shard's fds mean nothing in any other thread. They live in its state `S`, are made and
//! closed by the jobs it runs, and must never leave it (a job's result carries no fd). The
//! threads a job spawns share the shard's table, and a child process it starts inherits it. The
//! fds the process had when the shard started are in its table too, under the same numbers;
//! those opened elsewhere later are not.
use std::{
    any::Any,
    io,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    sync::{Arc, mpsc},
    thread::{self, JoinHandle},
};

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A thread with its own fd table and its state `S` (made there with `Default`), running the
/// jobs it is given in order. Dropping it drops the state on that thread, closing its fds in
/// the right table.
pub struct Shard<S> {
    jobs: Option<mpsc::Sender<Job<S>>>,
    thread: Option<JoinHandle<()>>,
}

/// A job's result, to wait for.
pub struct Pending<R>(mpsc::Receiver<Result<R, Box<dyn Any + Send>>>);

impl<R> Pending<R> {
    /// Waits for the job; a panic in it is resumed here.
    pub fn wait(self) -> R {
        match self.0.recv() {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(mpsc::RecvError) => panic!("a shard thread ended with a job pending"),
        }
    }
}

impl<S: Default + 'static> Shard<S> {
    pub fn spawn(name: String) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job<S>>();
        let (started, unshared) = mpsc::sync_channel(1);
        let thread = thread::Builder::new().name(name).spawn(move || {
            let result = crate::sys::unshare_fd_table();
            let ok = result.is_ok();
            // The spawner waits for this message: it cannot be gone.
            let _ = started.send(result);
            if ok {
                let mut state = S::default();
                for job in queue {
                    job(&mut state);
                }
            }
        })?;
        let shard = Self {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match unshared.recv() {
            Ok(Ok(())) => Ok(shard),
            Ok(Err(error)) => Err(error),
            Err(mpsc::RecvError) => Err(io::Error::other("a shard thread died starting")),
        }
    }

    /// Starts `work` on the shard's thread, with its state; [`Pending::wait`] gives the result.
    pub fn start<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Pending<R> {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job<S> = Box::new(move |state| {
            // Waited for by the caller, unless it panicked meanwhile.
            let _ = done.send(catch_unwind(AssertUnwindSafe(|| work(state))));
        });
        let jobs = self.jobs.as_ref().expect("the queue lives until drop");
        // The thread only ends when the queue closes; a failed send drops `done` and the wait
        // reports it.
        let _ = jobs.send(job);
        Pending(result)
    }

    /// Runs `work` on the shard's thread and waits for it.
    pub fn run<R: Send + 'static>(&self, work: impl FnOnce(&mut S) -> R + Send + 'static) -> R {
        self.start(work).wait()
    }
}

/// Runs `work(k, state)` on every shard k at once and returns the results in order.
pub fn run_all<S, R, F>(shards: &[Shard<S>], work: F) -> Vec<R>
where
    S: Default + 'static,
    R: Send + 'static,
    F: Fn(usize, &mut S) -> R + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let pending: Vec<Pending<R>> = shards
        .iter()
        .enumerate()
        .map(|(k, shard)| {
            let work = Arc::clone(&work);
            shard.start(move |state| work(k, state))
        })
        .collect();
    pending.into_iter().map(Pending::wait).collect()
}

impl<S> Drop for Shard<S> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("a shard thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

    use super::*;

    /// Sockets the fd limit allows in one table, minus room for what the process has open.
    fn per_table() -> usize {
        let limit = crate::handoff::raise_nofile_limit().unwrap() as usize;
        limit - 200
    }

    fn sockets(n: usize) -> io::Result<Vec<OwnedFd>> {
        (0..n)
            .map(|_| {
                let (family, kind) = (AddressFamily::Inet, SockType::Datagram);
                socket(family, kind, SockFlag::empty(), None).map_err(io::Error::from)
            })
            .collect()
    }

    #[test]
    fn shards_hold_more_fds_than_one_table_can() {
        let n = per_table();
        let shards: Vec<Shard<Vec<OwnedFd>>> = (0..3)
            .map(|k| Shard::spawn(format!("test-shard-{k}")).unwrap())
            .collect();
        let held = run_all(&shards, move |_, state| {
            *state = sockets(n)?;
            io::Result::Ok(state.len())
        });
        let held: usize = held.into_iter().map(Result::unwrap).sum();
        assert_eq!(held, 3 * n);
        // The process's own table is as empty as before: one more socket each still fits.
        assert!(sockets(100).is_ok());
        // And a fourth table's worth does not fit in it.
        assert!(sockets(n + 200).is_err());
    }

    #[test]
    fn a_panicking_job_panics_its_caller_and_the_shard_goes_on() {
        let shard: Shard<u32> = Shard::spawn("test-shard".to_owned()).unwrap();
        let panicked = catch_unwind(AssertUnwindSafe(|| shard.run(|_| panic!("in the job"))));
        assert!(panicked.is_err());
        assert_eq!(
            shard.run(|state| {
                *state += 1;
                *state
            }),
            1
        );
    }
}
