//! vmha-controller: the I/O-free core of `vmhad`.
//!
//! - [`config`]: the cluster's TOML file, parsed strictly and validated.
//! - [`generation`]: who is up to date — a node's persistent per-module data
//!   generation history and the comparison of two histories.
//! - [`state`]: the per-module cluster state machine, a pure function from
//!   (state, event) to (state, actions).

pub mod config;
pub mod generation;
pub mod state;
