//! Shared helpers of the cross-process integration tests.
