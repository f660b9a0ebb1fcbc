//! The picloud scheduler.
