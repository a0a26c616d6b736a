//! Completing a FUSE reply only when both the local operation and the peer's
//! acknowledgement(s) are in, whichever comes last. Disagreement between the two is
//! never silent: it marks the peer outdated through the link.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::apply::Errno;
use crate::link::{Completion, PeerLink};

/// What happened locally.
#[derive(Debug)]
pub enum Local<T> {
    Applied(Result<T, Errno>),
    /// Not attempted (the op could not be queued for the peer).
    NotApplied(Errno),
}

type Finish<T> = Box<dyn FnOnce(Result<T, Errno>) + Send>;

struct State<T> {
    local: Option<Local<T>>,
    remote_left: usize,
    remote_error: Option<Errno>,
    finish: Option<Finish<T>>,
}

/// One reply waiting for its local half and `remotes` peer acknowledgements.
pub struct Joint<T> {
    state: Arc<Mutex<State<T>>>,
    link: PeerLink,
    what: &'static str,
}

impl<T> std::fmt::Debug for Joint<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Joint({})", self.what)
    }
}

impl<T: Send + 'static> Joint<T> {
    pub fn new(link: &PeerLink, what: &'static str, remotes: usize, finish: Finish<T>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                local: None,
                remote_left: remotes,
                remote_error: None,
                finish: Some(finish),
            })),
            link: link.clone(),
            what,
        }
    }

    /// A completion for one of the peer's acknowledgements.
    pub fn remote(&self) -> Completion {
        let state = self.state.clone();
        let link = self.link.clone();
        let what = self.what;
        Box::new(move |result| {
            let mut s = state.lock();
            s.remote_left = s.remote_left.saturating_sub(1);
            if let Err(e) = result {
                s.remote_error.get_or_insert(e);
            }
            Self::maybe_finish(s, &link, what);
        })
    }

    /// Records the local outcome.
    pub fn local(self, local: Local<T>) {
        let mut s = self.state.lock();
        s.local = Some(local);
        Self::maybe_finish(s, &self.link, self.what);
    }

    fn maybe_finish(
        mut s: parking_lot::MutexGuard<'_, State<T>>,
        link: &PeerLink,
        what: &'static str,
    ) {
        let local_done = matches!(s.local, Some(Local::NotApplied(_)));
        if s.local.is_none() || (s.remote_left > 0 && !local_done) {
            return;
        }
        let (Some(local), Some(finish)) = (s.local.take(), s.finish.take()) else {
            return;
        };
        let remote_error = s.remote_error;
        drop(s);
        let result = match (local, remote_error) {
            (Local::NotApplied(e), _) => Err(e),
            (Local::Applied(Ok(v)), None) => Ok(v),
            (Local::Applied(Ok(v)), Some(e)) => {
                let what = format!("{what} applied locally but failed on the peer: {e}");
                if link.diverged(&what) {
                    // The peer is recorded as outdated: the local result stands.
                    Ok(v)
                } else {
                    Err(Errno::IO)
                }
            }
            (Local::Applied(Err(e)), None) => {
                link.diverged(&format!(
                    "{what} failed locally ({e}) but applied on the peer"
                ));
                Err(e)
            }
            (Local::Applied(Err(e)), Some(_)) => {
                // Both failed; content may still differ (partial writes).
                link.diverged(&format!("{what} failed on both nodes: {e}"));
                Err(e)
            }
        };
        finish(result);
    }
}
