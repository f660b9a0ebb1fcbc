//! The reservation of EASY backfilling.
//!
//! EASY (Lifka, "The ANL/IBM SP scheduling system", JSSPP 1995; analysed by
//! Mu'alem and Feitelson, IEEE TPDS 2001) gives the first queued job that does
//! not fit a reservation, and lets later jobs start only when they do not
//! delay it. [`Reservation::plan`] computes it from the expected ends of the
//! running tasks (start + requested walltime; an overdue task counts as ending
//! now):
//!
//! 1. For every usable node, the *fit time*: the earliest time at which one
//!    chunk of the job fits there if every task ends when expected. Each node
//!    keeps its tasks by expected end ([`NodeTable`]), so this walks only that
//!    node's tasks: forwards from what is free now when the chunk needs little
//!    more than that, backwards from the whole node when it needs most of it
//!    (a whole-node chunk costs one step).
//! 2. The *shadow time* is the `chunks`-th smallest fit time: when `chunks`
//!    distinct nodes can each hold a chunk.
//! 3. The reserved nodes are the first `chunks` nodes (in node order) that
//!    fit by the shadow time; what each has beyond one chunk at the shadow
//!    time is its *extra*.
//!
//! A later job may then start now if it fits now and either ends by the
//! shadow time, or uses only non-reserved nodes and the extra of reserved ones
//! ([`Reservation::admits`], [`Reservation::consume`]). Resources only grow
//! between now and the shadow time apart from such starts, so the reserved
//! nodes can still hold the job at the shadow time.
//!
//! A plan costs O(nodes × tasks walked per node + nodes log nodes), however
//! many tasks run in all.

use std::collections::{BTreeMap, BTreeSet};

use super::resources::{Allocation, NodeId, NodeShape, Placement, ResourceRequest, Resources};
use super::{Millis, TaskId};

/// Free (or needed) resources on one node: cores, memory bytes, GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Amount {
    pub(crate) cores: u32,
    pub(crate) mem: u64,
    pub(crate) gpus: u32,
}

impl Amount {
    fn covers(&self, need: &Amount) -> bool {
        self.cores >= need.cores && self.mem >= need.mem && self.gpus >= need.gpus
    }

    /// Adds without overflow (an amount only ever grows to a node's size,
    /// but a table that disagreed with the resources must not panic here).
    fn add(&mut self, a: &Amount) {
        self.cores = self.cores.saturating_add(a.cores);
        self.mem = self.mem.saturating_add(a.mem);
        self.gpus = self.gpus.saturating_add(a.gpus);
    }

    fn sub(&mut self, a: &Amount) {
        self.cores = self.cores.saturating_sub(a.cores);
        self.mem = self.mem.saturating_sub(a.mem);
        self.gpus = self.gpus.saturating_sub(a.gpus);
    }

    /// What an allocation holds on one node.
    fn held(alloc: &super::resources::NodeAllocation) -> Amount {
        Amount {
            cores: alloc.cores.len() as u32,
            mem: alloc.mem.iter().map(|&(_, m)| m).sum(),
            gpus: alloc.gpus.len() as u32,
        }
    }
}

/// What one chunk of `req` needs on a node of size `whole`: all of it when
/// exclusive.
fn chunk_need(whole: &Amount, req: &ResourceRequest) -> Amount {
    match req.placement {
        Placement::Exclusive => *whole,
        Placement::Compact | Placement::Scatter => Amount { cores: req.cores, mem: req.mem, gpus: req.gpus },
    }
}

/// Every node's size, free resources and running tasks by expected end, in
/// node order, kept by the core as it allocates and releases, so that
/// planning a reservation reads flat arrays and per-node end profiles rather
/// than looking every node up. [`NodeTable::check`] compares it with
/// [`Resources`].
#[derive(Debug, Default)]
pub(crate) struct NodeTable {
    ids: Vec<NodeId>,
    whole: Vec<Amount>,
    free: Vec<Amount>,
    /// Whether the node takes new tasks (it is not draining).
    usable: Vec<bool>,
    /// What each running task holds on the node, by (expected end, task).
    ends: Vec<BTreeMap<(Millis, TaskId), Amount>>,
}

impl NodeTable {
    fn position(&self, id: NodeId) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    /// A new node, all free.
    pub(crate) fn add(&mut self, id: NodeId, shape: &NodeShape) {
        self.remove(id);
        let whole = Amount { cores: shape.cores(), mem: shape.memory(), gpus: shape.gpus };
        let at = self.ids.partition_point(|&n| n < id);
        self.ids.insert(at, id);
        self.whole.insert(at, whole);
        self.free.insert(at, whole);
        self.usable.insert(at, true);
        self.ends.insert(at, BTreeMap::new());
    }

    pub(crate) fn remove(&mut self, id: NodeId) {
        if let Some(at) = self.position(id) {
            self.ids.remove(at);
            self.whole.remove(at);
            self.free.remove(at);
            self.usable.remove(at);
            self.ends.remove(at);
        }
    }

    pub(crate) fn set_usable(&mut self, id: NodeId, usable: bool) {
        if let Some(at) = self.position(id) {
            self.usable[at] = usable;
        }
    }

    /// `task`, expected to end at `end`, got `alloc`.
    pub(crate) fn take(&mut self, task: TaskId, end: Millis, alloc: &Allocation) {
        for held in &alloc.nodes {
            if let Some(at) = self.position(held.node) {
                let amount = Amount::held(held);
                self.free[at].sub(&amount);
                self.ends[at].insert((end, task), amount);
            }
        }
    }

    /// `task`, expected to end at `end`, released `alloc`.
    pub(crate) fn give_back(&mut self, task: TaskId, end: Millis, alloc: &Allocation) {
        for held in &alloc.nodes {
            if let Some(at) = self.position(held.node) {
                self.free[at].add(&Amount::held(held));
                self.ends[at].remove(&(end, task));
            }
        }
    }

    /// The earliest time (at least `now`) at which node `k` has `need` free if
    /// every task ends when expected; `None` if never.
    fn fit_time(&self, k: usize, need: &Amount, now: Millis) -> Option<Millis> {
        let (free, whole, ends) = (&self.free[k], &self.whole[k], &self.ends[k]);
        if free.covers(need) {
            return Some(now);
        }
        if !whole.covers(need) {
            return None;
        }
        if need.cores - free.cores.min(need.cores) <= whole.cores - need.cores {
            // Forwards: release tasks until the chunk fits.
            let mut f = *free;
            for (&(end, _), held) in ends {
                f.add(held);
                if f.covers(need) {
                    return Some(end.max(now));
                }
            }
            None
        } else {
            // Backwards: keep tasks running from the last one down while what
            // they hold leaves room for the chunk; the first that does not
            // must have ended.
            let mut room = *whole;
            room.sub(need);
            let mut kept = Amount::default();
            for (&(end, _), held) in ends.iter().rev() {
                kept.add(held);
                if !room.covers(&kept) {
                    return Some(end.max(now));
                }
            }
            Some(now)
        }
    }

    /// What node `k` has free at time `t` if every task ends when expected.
    fn free_at(&self, k: usize, t: Millis) -> Amount {
        let mut held_after = Amount::default();
        for (&(end, _), held) in self.ends[k].iter().rev() {
            if end <= t {
                break;
            }
            held_after.add(held);
        }
        let mut free = self.whole[k];
        free.sub(&held_after);
        free
    }

    /// Panics unless the table matches `resources` and the draining set, and
    /// its end profiles hold exactly what is not free.
    pub(crate) fn check(&self, resources: &Resources, draining: &BTreeSet<NodeId>) {
        let ids: Vec<NodeId> = resources.node_ids().collect();
        assert_eq!(ids, self.ids, "node table: nodes differ from the resources");
        for (k, &id) in self.ids.iter().enumerate() {
            let shape = resources.shape(id).expect("listed");
            let whole = Amount { cores: shape.cores(), mem: shape.memory(), gpus: shape.gpus };
            assert_eq!(self.whole[k], whole, "node table: size of {id:?}");
            let (cores, mem, gpus) = resources.node_free(id).expect("listed");
            assert_eq!(self.free[k], Amount { cores, mem, gpus }, "node table: free resources of {id:?}");
            assert_eq!(self.usable[k], !draining.contains(&id), "node table: whether {id:?} is usable");
            let mut total = self.free[k];
            for held in self.ends[k].values() {
                total.add(held);
            }
            assert_eq!(total, whole, "node table: free and held on {id:?} do not add up to the node");
        }
    }

    /// Number of tasks the table holds on node `id`.
    pub(crate) fn tasks_on(&self, id: NodeId) -> usize {
        self.position(id).map_or(0, |k| self.ends[k].len())
    }
}

/// The reservation of the first job that does not fit. See the module
/// documentation.
#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    /// The job it is for.
    pub(crate) seq: u64,
    /// When the job can start at the latest, if walltimes hold.
    pub(crate) shadow: Millis,
    /// Reserved nodes (sorted), their extra at the shadow time and their
    /// whole size (what an exclusive chunk needs).
    reserved: Vec<(NodeId, Amount, Amount)>,
}

impl Reservation {
    /// Plans the reservation of job `seq` needing `req` per task, at `now`,
    /// on the usable nodes of `table`. `None` when the usable nodes cannot
    /// hold the job even once every task has ended.
    ///
    /// Also returns the cores a task that runs past the shadow time can get
    /// now: free on the other usable nodes plus, on each reserved node, the
    /// smaller of its free cores and its extra.
    pub(crate) fn plan(
        seq: u64,
        req: &ResourceRequest,
        now: Millis,
        table: &NodeTable,
    ) -> Option<(Reservation, u64)> {
        let wanted = (req.chunks as usize).max(1);
        // 1. Fit time of every usable node.
        let mut fits: Vec<(Millis, usize)> = (0..table.ids.len())
            .filter(|&k| table.usable[k])
            .filter_map(|k| Some((table.fit_time(k, &chunk_need(&table.whole[k], req), now)?, k)))
            .collect();
        if fits.len() < wanted {
            return None;
        }
        // 2. The shadow time.
        let shadow = fits.select_nth_unstable(wanted - 1).1.0;
        // 3. The first nodes (in node order) that fit by then, with their extra.
        fits.retain(|&(t, _)| t <= shadow);
        fits.sort_unstable_by_key(|&(_, k)| k);
        let mut long_free: u64 =
            (0..table.ids.len()).filter(|&k| table.usable[k]).map(|k| u64::from(table.free[k].cores)).sum();
        let reserved = fits
            .iter()
            .take(wanted)
            .map(|&(_, k)| {
                let whole = table.whole[k];
                let mut extra = table.free_at(k, shadow);
                extra.sub(&chunk_need(&whole, req));
                let now_free = table.free[k].cores;
                long_free -= u64::from(now_free - now_free.min(extra.cores));
                (table.ids[k], extra, whole)
            })
            .collect();
        Some((Reservation { seq, shadow, reserved }, long_free))
    }

    /// Whether `node` is reserved.
    pub(crate) fn is_reserved(&self, node: NodeId) -> bool {
        self.reserved.binary_search_by_key(&node, |&(id, ..)| id).is_ok()
    }

    /// Whether a chunk of `req` (for a task that runs past the shadow time)
    /// may go on `node`: any non-reserved node, or a reserved one whose extra
    /// holds the chunk.
    pub(crate) fn admits(&self, node: NodeId, req: &ResourceRequest) -> bool {
        match self.reserved.binary_search_by_key(&node, |&(id, ..)| id) {
            Err(_) => true,
            Ok(i) => {
                let (_, extra, whole) = &self.reserved[i];
                extra.covers(&chunk_need(whole, req))
            }
        }
    }

    /// Takes what a task started past the shadow time holds out of the extra.
    pub(crate) fn consume(&mut self, alloc: &Allocation) {
        for held in &alloc.nodes {
            if let Ok(i) = self.reserved.binary_search_by_key(&held.node, |&(id, ..)| id) {
                self.reserved[i].1.sub(&Amount::held(held));
            }
        }
    }
}
