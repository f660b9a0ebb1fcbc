//! The picloud node agent: discovers the node's hardware ([`topology`]), starts
//! the command jobs the server places on it ([`launcher`]), and speaks the agent
//! side of the protocol ([`agent`]).

pub mod agent;
pub mod cgroup;
pub mod launcher;
pub mod topology;

pub use agent::{AgentConfig, AgentError, run};
