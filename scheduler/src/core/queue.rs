//! The queue of eligible jobs, kept in scheduling order.
//!
//! Only jobs that could start a task now (not held, dependencies met, an
//! unstarted task left) are in it. The order is a [`QueueKey`]: a rank that
//! the policy computes (0 for submission order, the walltime for shortest job
//! first, the inverted priority for multifactor), then the order in which the
//! jobs reached the core (which is sequence order, except for a job submitted
//! under a number reserved before others were submitted). A
//! `BTreeMap` keeps that order, so a scheduling pass walks the queue without
//! sorting it, and a job enters or leaves it in O(log n). Each entry carries
//! what a pass needs to skip a job cheaply (its size and walltime) without
//! looking the job up.

use std::collections::BTreeMap;

use super::Millis;

/// A job's place in the queue: lower first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct QueueKey {
    /// Policy rank; lower runs first.
    pub(crate) rank: u64,
    /// Arrival order breaks ties.
    pub(crate) arrival: u64,
    /// The job (unique per arrival, so it never decides the order).
    pub(crate) seq: u64,
}

/// What a pass needs to know about a queued job without looking it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueEntry {
    /// Cores one task takes, over all its chunks.
    pub(crate) cores: u64,
    /// Walltime of one task (requested, or the default).
    pub(crate) walltime: Millis,
}

/// Eligible jobs in scheduling order.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    entries: BTreeMap<QueueKey, QueueEntry>,
}

impl Queue {
    pub(crate) fn insert(&mut self, key: QueueKey, entry: QueueEntry) {
        let old = self.entries.insert(key, entry);
        debug_assert!(old.is_none(), "job {} queued twice", key.seq);
    }

    pub(crate) fn remove(&mut self, key: &QueueKey) {
        let old = self.entries.remove(key);
        debug_assert!(old.is_some(), "job {} was not queued", key.seq);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries in scheduling order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&QueueKey, &QueueEntry)> + '_ {
        self.entries.iter()
    }

    /// Replaces every key at once (after priorities changed): `rekey` gives
    /// each entry's new key.
    pub(crate) fn rebuild(&mut self, mut rekey: impl FnMut(&QueueKey) -> QueueKey) {
        let mut all: Vec<(QueueKey, QueueEntry)> =
            std::mem::take(&mut self.entries).into_iter().map(|(k, e)| (rekey(&k), e)).collect();
        all.sort_unstable_by_key(|&(k, _)| k);
        self.entries = all.into_iter().collect();
    }
}
