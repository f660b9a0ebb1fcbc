//! Benchmarks of picloud live in `benches/` and in the scripts beside this crate.
