//! The replicated operation: one type that says everything needed to replay a mutation.
//! The primary applies an `Op` to its directory and ships the same value; the receiver
//! applies it with the same function (`apply`).
//!
//! A sync also sends the receiver instructions that are not mutations the primary
//! made (`Control`: empty the directory, remove a stale entry, compare blocks, ...).
//! They travel in the same ordered stream, sharing its sequence numbers and acks, but
//! are a separate type so that `Op` is exactly "a replicated mutation" and `apply`
//! never sees one. A `Request` is either, as queued on the link.

use serde::{Deserialize, Serialize};

use crate::buffer::Payload;

/// Stable identifier of a file on both nodes for the life of a replication session.
/// `ROOT` is the replicated directory itself.
pub type NodeId = u64;
pub const ROOT: NodeId = 1;

/// Why a name or value from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than 255 bytes")]
    TooLong,
    #[error("name contains '/' (would leave its directory)")]
    Slash,
    #[error("name contains NUL")]
    Nul,
    #[error("name '.' or '..' (would leave its directory)")]
    Dots,
    #[error("symlink target empty, too long or containing NUL")]
    BadTarget,
    #[error("xattr value larger than 64 KiB")]
    ValueTooLarge,
}

/// One path component, checked so that it can only name an entry of its parent.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct Name(Vec<u8>);

impl Name {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, NameError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(NameError::Empty);
        }
        if bytes.len() > 255 {
            return Err(NameError::TooLong);
        }
        if bytes.contains(&b'/') {
            return Err(NameError::Slash);
        }
        if bytes.contains(&0) {
            return Err(NameError::Nul);
        }
        if bytes == b"." || bytes == b".." {
            return Err(NameError::Dots);
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(&self.0)
    }
}

impl TryFrom<Vec<u8>> for Name {
    type Error = NameError;
    fn try_from(bytes: Vec<u8>) -> Result<Self, NameError> {
        Self::new(bytes)
    }
}

impl From<Name> for Vec<u8> {
    fn from(name: Name) -> Vec<u8> {
        name.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A symlink target: stored verbatim, never followed by vmha.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct LinkTarget(Vec<u8>);

impl LinkTarget {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, NameError> {
        let bytes = bytes.into();
        if bytes.is_empty() || bytes.len() > 4095 || bytes.contains(&0) {
            return Err(NameError::BadTarget);
        }
        Ok(Self(bytes))
    }

    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(&self.0)
    }
}

impl TryFrom<Vec<u8>> for LinkTarget {
    type Error = NameError;
    fn try_from(bytes: Vec<u8>) -> Result<Self, NameError> {
        Self::new(bytes)
    }
}

impl From<LinkTarget> for Vec<u8> {
    fn from(target: LinkTarget) -> Vec<u8> {
        target.0
    }
}

impl std::fmt::Debug for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// An extended attribute value (Linux caps them at 64 KiB).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct XattrValue(Vec<u8>);

impl XattrValue {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, NameError> {
        let bytes = bytes.into();
        if bytes.len() > 65536 {
            return Err(NameError::ValueTooLarge);
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<Vec<u8>> for XattrValue {
    type Error = NameError;
    fn try_from(bytes: Vec<u8>) -> Result<Self, NameError> {
        Self::new(bytes)
    }
}

impl From<XattrValue> for Vec<u8> {
    fn from(value: XattrValue) -> Vec<u8> {
        value.0
    }
}

impl std::fmt::Debug for XattrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XattrValue({} bytes)", self.0.len())
    }
}

/// A point in time as seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// The kind of a non-directory node created by `Op::Create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Regular,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Ownership and permission bits of a new node, decided once by the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNode {
    pub id: NodeId,
    /// Permission bits (07777), umask already applied.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A replicated mutation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// The primary looked up `parent/name` and calls that node `id` from now on.
    Bind {
        id: NodeId,
        parent: NodeId,
        name: Name,
    },
    /// The primary no longer refers to `id`.
    Forget {
        id: NodeId,
    },
    Create {
        parent: NodeId,
        name: Name,
        node: NewNode,
        kind: NodeKind,
        rdev: u64,
    },
    Mkdir {
        parent: NodeId,
        name: Name,
        node: NewNode,
    },
    Symlink {
        parent: NodeId,
        name: Name,
        node: NewNode,
        target: LinkTarget,
    },
    Link {
        id: NodeId,
        parent: NodeId,
        name: Name,
    },
    Unlink {
        parent: NodeId,
        name: Name,
    },
    Rmdir {
        parent: NodeId,
        name: Name,
    },
    Rename {
        parent: NodeId,
        name: Name,
        new_parent: NodeId,
        new_name: Name,
        /// RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT bits.
        flags: u32,
    },
    SetAttr {
        id: NodeId,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Time>,
        mtime: Option<Time>,
    },
    Truncate {
        id: NodeId,
        size: u64,
    },
    Write {
        id: NodeId,
        offset: u64,
        /// Travels as the frame's data section, not inside the encoded header.
        #[serde(skip)]
        data: Payload,
    },
    Fallocate {
        id: NodeId,
        mode: u32,
        offset: u64,
        len: u64,
    },
    CopyRange {
        src: NodeId,
        src_offset: u64,
        dst: NodeId,
        dst_offset: u64,
        len: u64,
    },
    SetXattr {
        id: NodeId,
        name: Name,
        value: XattrValue,
        flags: u32,
    },
    RemoveXattr {
        id: NodeId,
        name: Name,
    },
    Fsync {
        id: NodeId,
        datasync: bool,
    },
}

impl Op {
    /// The node whose data (or whose binding to a file) this op may change:
    /// an fdatasync of that node must come after it to cover it. (`Forget`
    /// ends the id's records instead: the early-sync records drop it.)
    pub fn changes_data_of(&self) -> Option<NodeId> {
        match self {
            Op::Write { id, .. } | Op::Truncate { id, .. } | Op::Fallocate { id, .. } => Some(*id),
            Op::CopyRange { dst, .. } => Some(*dst),
            other => other.created_id(),
        }
    }

    /// The id a successful application of this op binds, if it creates a node.
    pub fn created_id(&self) -> Option<NodeId> {
        match self {
            Op::Bind { id, .. } => Some(*id),
            Op::Create { node, .. } | Op::Mkdir { node, .. } | Op::Symlink { node, .. } => {
                Some(node.id)
            }
            _ => None,
        }
    }

    /// Bytes of file data this op carries (for flow control).
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// An instruction of the sync to the receiver: not a mutation the primary made, but
/// part of the same ordered stream (same sequence numbers and acks as `Op`s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// Full sync: empty the directory (its content is outdated and about to be
    /// recreated) and forget every id but the root.
    Wipe,
    /// Sync the whole filesystem; acknowledged once every earlier operation is
    /// applied and durable (end of a sync, activity-log checkpoints).
    SyncAll,
    /// Changes nothing: hash `block`-byte blocks of `id` from `offset` (blake3; short
    /// at the end of the file, empty past it) and answer (`Message::Differ`) which
    /// differ from `hashes`.
    Compare {
        id: NodeId,
        offset: u64,
        block: u32,
        hashes: Vec<[u8; 32]>,
    },
    /// Resync: remove `parent/name`, and everything beneath it if it is a directory
    /// (the writer has nothing there, or something of another kind).
    Remove { parent: NodeId, name: Name },
    /// Resync: both copies are identical now (sent after an acknowledged `SyncAll`);
    /// the receiver's own records start afresh.
    InSync,
}

/// One entry of the ordered stream to the receiver: a mutation or a control.
#[derive(Clone, PartialEq)]
pub enum Request {
    Op(Op),
    Control(Control),
}

impl Request {
    /// Bytes of file data this request carries (for flow control).
    pub fn data_len(&self) -> usize {
        match self {
            Request::Op(op) => op.data_len(),
            Request::Control(_) => 0,
        }
    }
}

impl From<Op> for Request {
    fn from(op: Op) -> Self {
        Request::Op(op)
    }
}

impl From<Control> for Request {
    fn from(control: Control) -> Self {
        Request::Control(control)
    }
}

/// Shows the inner value only (divergence reasons name the operation as before).
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Op(op) => op.fmt(f),
            Request::Control(control) => control.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        assert_eq!(Name::new(&b"../../etc/x"[..]), Err(NameError::Slash));
        assert_eq!(Name::new(&b".."[..]), Err(NameError::Dots));
        assert_eq!(Name::new(&b"."[..]), Err(NameError::Dots));
        assert_eq!(Name::new(&b"/etc"[..]), Err(NameError::Slash));
        assert_eq!(Name::new(&b"a\0b"[..]), Err(NameError::Nul));
        assert_eq!(Name::new(Vec::new()), Err(NameError::Empty));
        assert_eq!(Name::new(vec![b'a'; 256]), Err(NameError::TooLong));
        assert!(Name::new(&b"..hidden"[..]).is_ok());
        assert!(Name::new(&b"disk.qcow2"[..]).is_ok());
    }
}
