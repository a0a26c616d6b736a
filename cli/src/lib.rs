//! What `vmhad`, `vmha-fs` and `vmctl` share at their edges, kept out of the
//! crates that do the work:
//! - [`logging`]: where log lines go. Under systemd they go to journald with
//!   structured fields (`VMHA_NODE`, `VMHA_MODULE`, ...), elsewhere as plain
//!   text to stderr (colours only on a terminal).
//! - [`docs`]: the man pages and shell completions, generated from each
//!   binary's own clap definition (`BINARY --generate-docs DIR`, run by
//!   `make deb`), so they never drift from `--help`.

pub mod docs;
pub mod logging;
