//! Where the log lines of a vmha binary go.
//!
//! Under systemd, stderr is connected to the journal and systemd says so in
//! `JOURNAL_STREAM` (`<device>:<inode>` of that stream). Then the lines go to
//! journald through its native socket instead, with structured fields an
//! operator can filter on: every field of an event under the `VMHA_` prefix
//! (`journalctl -u vmhad VMHA_MODULE=vm1`), the process's own `VMHA_NODE` /
//! `VMHA_MODULE` on every record, and the level as the journal priority.
//! Elsewhere (a terminal, a test, a file) they are plain text on stderr,
//! coloured only when stderr is a terminal: no escape codes in files.
//!
//! The variable alone is not enough: a child whose stderr was redirected
//! inherits it, so stderr's own device and inode must match. When they match
//! but journald does not answer, the lines stay on stderr (the journal stream
//! still catches them) and the first line says why.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The prefix of every event field in the journal (`module` is `VMHA_MODULE`).
pub const FIELD_PREFIX: &str = "VMHA";

/// Where [`init`] sends the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Journald,
    Stderr,
}

/// Fields added to every journald record of this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fields<'a> {
    /// This node's name (`VMHA_NODE`).
    pub node: Option<&'a str>,
    /// The module this process serves (`VMHA_MODULE`), for a vmha-fs.
    pub module: Option<&'a str>,
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM`
/// names stderr's device and inode).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the process's log subscriber (`RUST_LOG` filters, default `info`)
/// and says where the lines go. A second call changes nothing.
pub fn init(fields: Fields<'_>) -> Target {
    let mut journald_error = None;
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let custom = [("VMHA_NODE", fields.node), ("VMHA_MODULE", fields.module)]
                    .into_iter()
                    .filter_map(|(name, value)| value.map(|v| (name, v)));
                let layer = layer
                    .with_field_prefix(Some(FIELD_PREFIX.to_string()))
                    .with_custom_fields(custom);
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return Target::Journald;
            }
            Err(e) => journald_error = Some(e),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal only: files and the journal get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    if let Some(e) = journald_error {
        tracing::warn!(error = %e, "stderr is the journal but journald's socket does not answer: logging plain text to stderr");
    }
    Target::Stderr
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The variable alone is not the journal: it must name stderr itself
    /// (here the test's stderr, whatever it is, is never `1:1`).
    #[test]
    fn journal_stream_must_match_stderr() {
        let fd = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let meta = std::fs::File::from(fd).metadata().unwrap();
        // The only test of this binary that touches the environment.
        std::env::set_var("JOURNAL_STREAM", "1:1");
        assert!(!stderr_is_journal());
        let matching = format!("{}:{}", meta.dev(), meta.ino());
        std::env::set_var("JOURNAL_STREAM", &matching);
        assert!(stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }
}
