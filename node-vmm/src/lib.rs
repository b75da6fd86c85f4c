//! `node-vmm` as a library: the node agent, the standalone runner and the
//! host checks, for the `node-vmm` binary and for the tests and benchmarks
//! that drive the agent's own code (`tests/src/bin/bench-scale.rs` writes
//! VM statuses with [`agent::status_body`] and heartbeats with
//! [`agent::node::NodeReporter`]).

pub mod agent;
pub mod console_log;
pub mod doctor;
pub mod standalone;
