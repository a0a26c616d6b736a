//! The cluster key: 32 random bytes shared by both nodes, stored as hex in a 0600 file.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Errors loading or creating a cluster key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {0} is malformed: expected 64 hexadecimal characters")]
    Malformed(PathBuf),
    #[error("key file {0} is readable by group or others (mode must be 0600 or stricter)")]
    TooOpen(PathBuf),
    #[error("key file {path} is owned by uid {uid}, not root: `chown root:root` it")]
    NotRootOwned { path: PathBuf, uid: u32 },
}

/// The shared secret that authenticates the two nodes to each other.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Writes a new key to `path`; refuses to overwrite an existing file.
    pub fn generate_file(path: &Path) -> Result<Self, KeyError> {
        let key = Self::generate();
        let write_err = |source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        writeln!(file, "{}", key.to_hex()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        Ok(key)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.is_dir() {
            return Err(read_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::TooOpen(path.to_path_buf()));
        }
        // Whoever owns the file can change it (and its mode): only root may.
        if meta.uid() != 0 {
            return Err(KeyError::NotRootOwned {
                path: path.to_path_buf(),
                uid: meta.uid(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::from_hex(text.trim()).ok_or_else(|| KeyError::Malformed(path.to_path_buf()))
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_through_its_file() -> Result<(), KeyError> {
        let dir = tempfile::tempdir().map_err(|source| KeyError::Write {
            path: PathBuf::from("tempdir"),
            source,
        })?;
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::generate_file(&path)?;
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterKey::load(&path)?.as_bytes(), key.as_bytes());
        assert!(matches!(
            ClusterKey::generate_file(&path),
            Err(KeyError::Write { .. })
        ));
        Ok(())
    }

    #[test]
    fn malformed_and_open_keys_are_refused() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let path = dir.path().join("k");
        let _ = std::fs::write(&path, "zz");
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        assert!(matches!(
            ClusterKey::load(&path),
            Err(KeyError::Malformed(_))
        ));
        let _ = std::fs::write(&path, "00".repeat(32));
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        assert!(matches!(ClusterKey::load(&path), Err(KeyError::TooOpen(_))));
        assert!(matches!(
            ClusterKey::load(&dir.path().join("missing")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn a_key_not_owned_by_root_is_refused_by_name() -> Result<(), KeyError> {
        let dir = tempfile::tempdir().map_err(|source| KeyError::Write {
            path: PathBuf::from("tempdir"),
            source,
        })?;
        let path = dir.path().join("cluster.key");
        ClusterKey::generate_file(&path)?;
        ClusterKey::load(&path)?;
        // Tests run as root; hand the file to another user.
        std::os::unix::fs::chown(&path, Some(65534), None).map_err(|source| KeyError::Write {
            path: path.clone(),
            source,
        })?;
        let e = ClusterKey::load(&path).err();
        assert!(
            matches!(&e, Some(KeyError::NotRootOwned { uid: 65534, .. })),
            "{e:?}"
        );
        let text = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.contains("cluster.key") && text.contains("root"),
            "{text}"
        );
        Ok(())
    }
}
