//! The picloud wire protocol: the messages every picloud process exchanges,
//! the frames that carry them, and a blocking client connection.
//!
//! A connection is a byte stream (a Unix socket or TCP) carrying frames: a
//! 4-byte little-endian payload length followed by that many bytes of a
//! bincode-encoded message. The first frame each side sends is a [`Hello`]; the
//! server answers with [`ServerReply::Welcome`] or an error and closes.
//! Frames larger than [`MAX_FRAME_LEN`] are refused before they are read.
//!
//! [`local_wire`] is the other, node-local protocol: between a node agent and
//! its Python workers, and between the agent and local clients (`agent.sock`).

pub mod client;
pub mod frame;
pub mod ids;
pub mod local_wire;
pub mod msg;
pub mod submit_env;

pub use client::{Client, ClientError, ServerAddr};
pub use frame::{FrameError, FrameReader, read_frame, write_frame};
pub use ids::{ArrayIndices, IndexRange, JobRef, ParseJobRefError, TaskId};
pub use msg::*;

/// Version of the protocol spoken by this build. Peers must match exactly.
///
/// 2: [`NodeInfo`] gained `package_pus`, `l3` and `gpus`.
/// 4: agents reconnect: [`AgentMsg::Heartbeat`], [`AgentMsg::Running`]
/// (with [`TaskRunning`]); [`JobInfo`] gained `run_count`.
/// 5: [`ClientRequest::Wait`] gained `until` (all or any) and `reply` (states
/// or results).
/// 6: [`ClientRequest::Reserve`] and [`ClientRequest::SubmitReserved`]: a
/// client names its jobs before it sends them, and pipelines submissions.
pub const PROTOCOL_VERSION: u32 = 6;

/// Magic number at the start of every [`Hello`], so that a stray peer (an HTTP
/// client, a port scanner) is recognised at once.
pub const HELLO_MAGIC: u32 = 0x5049_434C; // "PICL"

/// Largest payload a frame may carry (64 MiB). Scripts and environments are far
/// smaller; bulk data travels through shared memory, not frames.
pub const MAX_FRAME_LEN: usize = 64 << 20;

/// Name of the server's Unix socket inside the state directory.
pub const SOCKET_NAME: &str = "server.sock";
