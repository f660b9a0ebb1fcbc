//! The picloud scheduler: a pure, deterministic scheduling [`core`], the
//! [`server`] that feeds it events from clients and agents and carries its
//! decisions out, and a [`sim`]ulator that replays workload traces through the
//! same core in virtual time.

pub mod core;
pub mod server;
pub mod sim;
