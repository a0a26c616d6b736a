//! What the two roles of the `vmha-fs` binary share at run time: one error type
//! (each one line, for the operator), the checks of the directories they are
//! given, and the open-file limit. The binary only parses arguments and calls
//! [`crate::primary::run`] or [`crate::secondary::run`] (mini-redis style: a thin
//! binary over a library).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// Errors of running a primary or a secondary (each one line).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Key(#[from] crate::key::KeyError),
    #[error(transparent)]
    State(#[from] crate::statedir::StateError),
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    #[error(transparent)]
    Receiver(#[from] crate::receiver::ReceiverError),
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    #[error(transparent)]
    Track(#[from] crate::track::TrackError),

    #[error("refusing to start replicating at once: the records in {0} say the peer may lack changes made here; start with --alone and attach the peer (SIGUSR2) to resync them")]
    NotInSync(PathBuf),
    #[error("{what} directory {path}: {reason}")]
    Dir {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0} is already mounted (a FUSE filesystem is mounted there)")]
    AlreadyMounted(PathBuf),
    #[error("refusing to mount over {dir}: process {pid} ({command}) has {path} open; its writes would bypass replication")]
    OpenBeneath {
        dir: PathBuf,
        pid: u32,
        command: String,
        path: PathBuf,
    },
    #[error("cannot mount {path}: {source}")]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to write: this node's copy is recorded as not up to date ({reason}); it must first be resynced as the secondary (remove {path} only if you know this copy is the one to keep)")]
    SelfOutdated { path: PathBuf, reason: String },
    #[error("{0}")]
    Other(String),
}

/// Raises the soft open-file limit to the hard one: a resync holds many files.
pub fn raise_fd_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = limit.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Checks that `path` is a directory and returns its canonical form.
pub(crate) fn existing_dir(what: &'static str, path: &Path) -> Result<PathBuf, RunError> {
    let dir_err = |reason: String| RunError::Dir {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| dir_err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(dir_err("not a directory".into()));
    }
    path.canonicalize().map_err(|e| dir_err(e.to_string()))
}

pub(crate) fn open_dir(what: &'static str, path: &Path) -> Result<OwnedFd, RunError> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RunError::Dir {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let vfs = rustix::fs::fstatvfs(&fd).map_err(|e| RunError::Other(e.to_string()))?;
    if vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
        return Err(RunError::Dir {
            what,
            path: path.to_path_buf(),
            reason: "is read-only (a read-only bind left by a killed secondary? `umount` it)"
                .into(),
        });
    }
    Ok(fd)
}

/// The nice value of vmha-fs's data path (see [`raise_data_path_priority`]).
/// Above the guests' vCPU threads (nice 0), below vmhad's heartbeat thread
/// (nice -10), which must win over replication traffic to detect failures on
/// time.
pub const DATA_PATH_NICE: i32 = -5;

/// Runs the calling thread, and every thread it starts afterwards (Linux
/// applies a nice value per thread; new threads inherit it), at
/// [`DATA_PATH_NICE`]: call it before the FUSE, link and receiver threads
/// start. Measured on a loaded 2-vCPU machine, a replicated 1 MiB write costs
/// the two daemons ~1.4 ms of CPU in several hops (FUSE thread, sender,
/// receiver, acknowledgements), each waiting for a CPU share behind the
/// guests' threads; at a higher priority the hops are served ahead of them
/// (a guest's own I/O is what they do). Without the privilege to lower the
/// nice value (not root), the default stays and this says so at debug level.
pub fn raise_data_path_priority() {
    if let Err(e) = rustix::process::setpriority_process(None, DATA_PATH_NICE) {
        tracing::debug!("cannot run the data path at nice {DATA_PATH_NICE}: {e}");
    }
}
