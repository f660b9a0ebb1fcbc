//! The picloud node agent.
