//! The picloud scheduler: a pure, deterministic scheduling [`core`] and the
//! [`server`] that feeds it events from clients and agents and carries its
//! decisions out.

pub mod core;
pub mod server;
