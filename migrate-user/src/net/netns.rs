//! Network namespaces named the way `ip netns` does (/run/netns/NAME) or by path
//! (/proc/PID/ns/net), and running code inside one.
use std::{
    fmt,
    fs::File,
    io,
    os::fd::AsFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {spec}: cannot open {path}")]
    Open {
        spec: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("network namespace {0}: setns failed")]
    Enter(String, #[source] io::Error),
}

/// An open network namespace: holding the fd keeps it alive while we use it.
pub struct Netns {
    spec: String,
    file: File,
    inode: u64,
}

impl Netns {
    /// `spec` is a name under /run/netns or a path such as /proc/PID/ns/net.
    pub fn open(spec: &str) -> Result<Self, NetnsError> {
        let path = if spec.contains('/') {
            PathBuf::from(spec)
        } else {
            Path::new("/run/netns").join(spec)
        };
        let open_error = |source| NetnsError::Open {
            spec: spec.to_owned(),
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_error)?;
        let inode = file.metadata().map_err(open_error)?.ino();
        Ok(Self {
            spec: spec.to_owned(),
            file,
            inode,
        })
    }

    /// The namespace this process was started in.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/self/ns/net")
    }

    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Identifies the namespace whatever name or path it was opened by.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` on a fresh thread that has entered this namespace; the caller's thread keeps its
    /// own. Sockets created and interfaces named inside `f` belong to this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                self.enter_current_thread()?;
                Ok(f())
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into this namespace (for threads that live there for good).
    pub fn enter_current_thread(&self) -> Result<(), NetnsError> {
        crate::sys::enter_netns(self.file.as_fd())
            .map_err(|source| NetnsError::Enter(self.spec.clone(), source))
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns({} inode {})", self.spec, self.inode)
    }
}
