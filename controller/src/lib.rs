//! vmha-controller: `vmhad`, its I/O-free core and the runtime around it.
//!
//! Core (no I/O):
//! - [`config`]: the cluster's TOML file, parsed strictly and validated.
//! - [`generation`]: who is up to date — a node's persistent per-module data
//!   generation history and the comparison of two histories.
//! - [`state`]: the per-module cluster state machine, a pure function from
//!   (state, event) to (state, actions).
//!
//! Runtime:
//! - [`heartbeat`]: authenticated UDP heartbeats on every network, liveness.
//! - [`driver`]: the VM (libvirt) and filesystem (vmha-fs) drivers behind
//!   traits, with fakes for tests.
//! - [`daemon`]: per-module tasks running the state machine, the dispatcher,
//!   the heartbeat sender.
//! - [`control`]: the control socket (JSON lines) and its client.
//! - [`channel`]: the authenticated TCP channel between the two daemons (peer
//!   status, remote commands, config push), version-negotiated.
//! - [`status`]: the `vmctl status --json` shape.
//! - [`eventlog`]: the per-module event log.
//! - [`clock`]: the wall clock, for display only (and its test offset).
//! - [`witness`]: the split-brain witness probe.
//! - [`systemd`]: readiness, status and watchdog for `Type=notify`.
//! - [`leave`]: the node's persisted leave (`vmctl leave` / `join`).

// Durations, sizes and wire fields narrow only explicitly and checked.
#![deny(clippy::cast_possible_truncation)]

pub mod backoff;
pub mod channel;
pub mod check;
pub mod clock;
pub mod config;
pub mod config_diff;
pub mod control;
pub mod daemon;
pub mod driver;
pub mod eventlog;
pub mod generation;
pub mod heartbeat;
pub mod leave;
pub mod migrate;
pub mod report;
pub mod state;
pub mod status;
pub mod systemd;
pub mod web;
pub mod witness;
