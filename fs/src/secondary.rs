//! The secondary: receives the primary's operations into its directory, which
//! is made read-only for everyone else (`vmha-fs secondary`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::key::ClusterKey;
use crate::mounts::ReadOnlyBind;
use crate::receiver::ReceiverServer;
use crate::runtime::{existing_dir, open_dir, RunError};
use crate::statedir::StateDir;
use crate::track::Tracker;

/// What `vmha-fs secondary` was asked to do.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    pub backing: PathBuf,
    pub listen: SocketAddr,
    pub module: String,
    pub state: PathBuf,
    pub key_file: PathBuf,
    pub accept_generation: Option<crate::status::GenerationId>,
    pub save_aside: bool,
}

/// Serves until SIGTERM or SIGINT.
pub fn run(args: SecondaryConfig) -> Result<(), RunError> {
    let SecondaryConfig {
        backing,
        listen,
        module,
        state,
        key_file,
        accept_generation,
        save_aside,
    } = args;
    let (state, key_file) = (state.as_path(), key_file.as_path());
    let key = ClusterKey::load(key_file)?;
    let backing = existing_dir("backing", &backing)?;
    // A FUSE mount over the directory (a standby mount of a live swap, a
    // writer's): the receiver would open the mount instead of the directory.
    if crate::mounts::is_fuse_mounted(&backing)? {
        return Err(RunError::AlreadyMounted(backing));
    }
    let state_dir = Arc::new(StateDir::open(state)?);
    let tracker = Tracker::open(state_dir.path(), crate::track::DEFAULT_AL_EXTENTS)?;
    if let Some(reason) = state_dir.self_outdated() {
        // This copy's records say nothing reliable any more (its disk failed while
        // it was the writer): the writer compares every block.
        tracing::warn!(
            reason = reason.trim(),
            "this copy is recorded as not up to date; the writer will compare it block by block"
        );
        tracker
            .invalidate()
            .map_err(|e| RunError::Other(format!("cannot invalidate the records: {e}")))?;
        clear_self_outdated_when_in_sync(state_dir.clone(), tracker.clone())?;
    }
    let root = open_dir("backing", &backing)?;
    let server = ReceiverServer::bind(listen, root, key, &module)?
        .accept_only_generation(accept_generation.map(String::from))
        .with_tracker(tracker);
    let server = if save_aside {
        server.save_aside_to(state_dir.path().to_path_buf())
    } else {
        server
    };
    // After the descriptor is open: only the receiver can write from now on.
    let _read_only = ReadOnlyBind::new(&backing)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| RunError::Other(format!("cannot install signal handler: {e}")))?;
    }
    publish_writer_heard(
        state_dir.path().to_path_buf(),
        server.writer_heard(),
        stop.clone(),
    )?;
    let addr = server.local_addr().map_or(listen, |a| a);
    tracing::info!(backing = %backing.display(), %addr, "secondary ready");
    server
        .serve(&stop)
        .map_err(|e| RunError::Other(format!("receiver failed: {e}")))?;
    tracing::info!("secondary stopped");
    Ok(())
}

/// How often `heard.json` is refreshed (when it changed).
const HEARD_EVERY: Duration = Duration::from_millis(200);
/// `heard.json`'s fixed length: the JSON object padded with spaces (valid
/// JSON whitespace) and a newline, so that it can be overwritten in place.
const HEARD_LEN: usize = 96;

/// [`WriterHeard`](crate::status::WriterHeard)'s JSON padded to [`HEARD_LEN`].
fn heard_bytes(now: crate::status::WriterHeard) -> Vec<u8> {
    use crate::status::StatusFile;
    let mut bytes = now.encode();
    bytes.pop(); // the newline, put back at the end
    if bytes.len() < HEARD_LEN - 1 {
        bytes.resize(HEARD_LEN - 1, b' ');
    }
    bytes.push(b'\n');
    bytes
}

/// Keeps `STATEDIR/heard.json` current: when the writer was last heard (its
/// operations or its pings, sent every 500 ms when idle). Created once with
/// a rename, then overwritten in place (one `pwrite` of a fixed length, not
/// synced) each time it changes: with every idle module's writer pinging
/// twice a second, creating and renaming a file per ping cost each node
/// about 0.8 % of a core for 32 modules (issue 12, item 2). A reader may
/// meet a write half done: it reads until two reads agree
/// ([`crate::status::read_heard`]); the reader is on this host.
fn publish_writer_heard(
    state: PathBuf,
    probe: crate::receiver::WriterHeardProbe,
    stop: Arc<AtomicBool>,
) -> Result<(), RunError> {
    use std::os::unix::fs::FileExt;
    std::thread::Builder::new()
        .name("writer-heard".into())
        .spawn(move || {
            let path = state.join(crate::status::HEARD);
            let tmp = state.join(format!("{}.tmp", crate::status::HEARD));
            let mut file: Option<std::fs::File> = None;
            let mut last = None;
            let mut failing = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now = probe.now();
                if last != Some(now) {
                    let bytes = heard_bytes(now);
                    let written = match &file {
                        Some(f) => f.write_all_at(&bytes, 0),
                        None => std::fs::write(&tmp, &bytes)
                            .and_then(|()| std::fs::rename(&tmp, &path))
                            .and_then(|()| {
                                file = Some(std::fs::OpenOptions::new().write(true).open(&path)?);
                                Ok(())
                            }),
                    };
                    match written {
                        Ok(()) => {
                            last = Some(now);
                            failing = false;
                        }
                        Err(e) => {
                            // Created again by the next try.
                            file = None;
                            if !failing {
                                failing = true;
                                tracing::warn!(path = %path.display(), "cannot publish heard.json: {e}");
                            }
                        }
                    }
                }
                std::thread::sleep(HEARD_EVERY);
            }
        })
        .map(drop)
        .map_err(|e| RunError::Other(format!("cannot start a thread: {e}")))
}

/// Removes `self-outdated` once a resync made this copy identical to the
/// writer's (the records become valid only then).
fn clear_self_outdated_when_in_sync(
    state: Arc<StateDir>,
    tracker: Arc<Tracker>,
) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name("self-outdated".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            if tracker.is_valid() {
                match state.clear_self_outdated() {
                    Ok(()) => tracing::info!("this copy is up to date again"),
                    Err(e) => tracing::error!("cannot clear the self-outdated record: {e}"),
                }
                return;
            }
        })
        .map(drop)
        .map_err(|e| RunError::Other(format!("cannot start a thread: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::status::{read_heard, WriterHeard};
    use std::os::unix::fs::FileExt;

    /// Every value has the same length, so an overwrite in place never
    /// leaves a longer value's tail behind, and reads back as written.
    #[test]
    fn heard_json_is_overwritten_in_place_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let values = [
            WriterHeard {
                connected: false,
                last_frame_ms: u64::MAX,
            },
            WriterHeard {
                connected: true,
                last_frame_ms: 7,
            },
            WriterHeard {
                connected: false,
                last_frame_ms: 0,
            },
        ];
        let path = dir.path().join(crate::status::HEARD);
        std::fs::write(&path, heard_bytes(values[0])).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for v in values {
            let bytes = heard_bytes(v);
            assert_eq!(bytes.len(), HEARD_LEN);
            f.write_all_at(&bytes, 0).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), HEARD_LEN as u64);
            assert_eq!(read_heard(dir.path()), Some(v));
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read_heard(dir.path()), None);
    }
}
