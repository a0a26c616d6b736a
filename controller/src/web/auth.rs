//! Who may use the console: the admin password (an argon2 hash in
//! `STATE_DIR/web-password`, 0600, written by `vmctl web-password`), the
//! sessions (random tokens in Secure, HttpOnly, SameSite=Strict cookies, each
//! with its own CSRF token that every action must send back) and the limit on
//! failed logins (per client address, doubling back-off, logged).
//!
//! Without a password file no login succeeds: a fresh node serves only the
//! login form until the operator sets a password.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;

/// The password file's name in the state directory.
pub const PASSWORD_FILE: &str = "web-password";
/// The one user of the console.
pub const ADMIN: &str = "admin";
/// A session unused this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);
/// Failed logins from one address allowed before the back-off starts.
pub const FREE_FAILURES: u32 = 3;
/// Longest back-off between two attempts from one address.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Sessions kept at most (the oldest is dropped beyond).
const MAX_SESSIONS: usize = 64;
/// Addresses whose failures are remembered at most.
const MAX_TRACKED: usize = 4096;

/// Errors setting or checking the password.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the password must not be empty")]
    Empty,
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The password file of a state directory.
pub fn password_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PASSWORD_FILE)
}

/// Stores `password` as an argon2 hash (mode 0600, atomically).
pub fn set_password(state_dir: &Path, password: &str) -> Result<PathBuf, AuthError> {
    if password.is_empty() {
        return Err(AuthError::Empty);
    }
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    let salt = SaltString::encode_b64(&raw).map_err(|e| AuthError::Hash(e.to_string()))?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    let path = password_path(state_dir);
    let write = |source| AuthError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(write)?;
    vmha_fs::atomic::write(&path, format!("{hash}\n").as_bytes()).map_err(write)?;
    Ok(path)
}

/// Whether `password` matches the stored hash. `None`: no password was set
/// (or the file is unreadable/invalid, logged): nobody can log in.
pub fn check_password(state_dir: &Path, password: &str) -> Option<bool> {
    let path = password_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", path.display());
            return None;
        }
    };
    let hash = match PasswordHash::new(text.trim()) {
        Ok(hash) => hash,
        Err(e) => {
            tracing::error!("{} holds no valid hash: {e}", path.display());
            return None;
        }
    };
    Some(
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
    )
}

/// A logged-in session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    last_used: Instant,
}

fn token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without an early exit (tokens are secrets).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Failed logins of one address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// No attempt is checked before this.
    blocked_until: Instant,
}

/// Sessions and the login limiter.
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// What a login attempt may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Too many failures: retry after this long.
    Wait(Duration),
}

impl Sessions {
    /// A new session for `user`: (cookie token, session).
    pub fn create(&self, user: &str) -> (String, Session) {
        let session = Session {
            user: user.to_string(),
            csrf: token(),
            last_used: Instant::now(),
        };
        let id = token();
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The session of a cookie token, if valid (and marks it used).
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let session = map.get_mut(id)?;
        if session.last_used.elapsed() >= SESSION_IDLE {
            map.remove(id);
            return None;
        }
        session.last_used = Instant::now();
        Some(session.clone())
    }

    pub fn remove(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Whether `from` may try a password now.
    pub fn admit(&self, from: IpAddr) -> Admission {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&from) {
            Some(f) => {
                let now = Instant::now();
                if f.blocked_until > now {
                    Admission::Wait(f.blocked_until - now)
                } else {
                    Admission::Go
                }
            }
            None => Admission::Go,
        }
    }

    /// Records a failed login from `from`; returns the failures so far.
    pub fn failed(&self, from: IpAddr) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&from) {
            let now = Instant::now();
            map.retain(|_, f| f.blocked_until > now);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let entry = map.entry(from).or_insert(Failures {
            count: 0,
            blocked_until: Instant::now(),
        });
        entry.count = entry.count.saturating_add(1);
        if entry.count >= FREE_FAILURES {
            let doublings = (entry.count - FREE_FAILURES).min(6);
            let backoff = Duration::from_secs(1u64 << doublings).min(MAX_BACKOFF);
            entry.blocked_until = Instant::now() + backoff;
        }
        entry.count
    }

    /// A successful login forgets the address's failures.
    pub fn succeeded(&self, from: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_password(dir.path(), "x"), None);
        let path = set_password(dir.path(), "s3cret").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(check_password(dir.path(), "s3cret"), Some(true));
        assert_eq!(check_password(dir.path(), "wrong"), Some(false));
        assert!(!std::fs::read_to_string(&path).unwrap().contains("s3cret"));
        assert!(matches!(
            set_password(dir.path(), ""),
            Err(AuthError::Empty)
        ));
    }

    #[test]
    fn failures_back_off() {
        let s = Sessions::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        for _ in 0..FREE_FAILURES - 1 {
            s.failed(ip);
            assert_eq!(s.admit(ip), Admission::Go);
        }
        s.failed(ip);
        assert!(matches!(s.admit(ip), Admission::Wait(_)));
        s.succeeded(ip);
        assert_eq!(s.admit(ip), Admission::Go);
    }

    #[test]
    fn sessions() {
        let s = Sessions::default();
        let (id, session) = s.create(ADMIN);
        assert_eq!(s.get(&id).unwrap().csrf, session.csrf);
        assert!(s.get("nope").is_none());
        s.remove(&id);
        assert!(s.get(&id).is_none());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("a", "ab"));
    }
}
