//! The picloud node agent: discovers the node's hardware ([`topology`]), starts
//! the command jobs the server places on it ([`launcher`]) in cgroups
//! ([`cgroup`]), runs Python tasks on warm workers ([`workers`], spoken to in
//! the [`local_wire`] protocol), keeps the node's shared-memory segments
//! ([`shm`]), and speaks the agent side of the protocol ([`agent`]).

pub mod agent;
pub mod cgroup;
pub mod launcher;
pub mod shm;
pub mod topology;
pub mod workers;

/// The node-local protocol, defined beside the server's in `picloud-proto`.
pub use picloud_proto::local_wire;

pub use agent::{AgentConfig, AgentError, run};
