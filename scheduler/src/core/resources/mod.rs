//! Resources of the cluster and their placement.
//!
//! [`NodeShape`] describes a node's hardware as the core sees it: cores with
//! their PUs, NUMA nodes with their memory, L3 caches, packages and GPUs.
//! [`Resources`] holds every node's free cores, memory and GPUs and answers
//! [`Resources::allocate`] with an [`Allocation`] that names exactly which
//! cores (and their PUs), how much memory on which NUMA node, and which GPUs.
//!
//! # Placement within a node
//!
//! - [`Placement::Compact`]: one NUMA node whenever one has the free cores
//!   and memory (the best fit: the one with the fewest free cores that still
//!   fits), and inside it one L3 cache when one fits (again the best fit),
//!   else the largest L3s first. A request too large for any one NUMA node
//!   takes the fewest NUMA nodes that hold it (largest first, the best fit
//!   for the rest), with memory split over them in proportion to their cores.
//!   GPUs local to the chosen NUMA nodes are taken first; a GPU request
//!   prefers a NUMA node that has them.
//! - [`Placement::Scatter`]: cores dealt round-robin over the NUMA nodes
//!   (most free first), and within each over its L3s; memory split evenly
//!   over the NUMA nodes used.
//! - [`Placement::Exclusive`]: a node with nothing in use, all of it.
//!
//! Memory never comes from a NUMA node beyond its free memory; what the chosen
//! NUMA nodes cannot hold comes from the others, most free first. Best fit,
//! the heuristic of dynamic storage allocation and bin packing (Knuth,
//! *TAOCP* vol. 1, §2.5, weighs it against first fit), leaves the largest
//! free NUMA nodes and L3s whole for the requests that need them.
//!
//! # Choosing a node
//!
//! Nodes are not scanned: each sits in bucket queues (`index.rs`) keyed by a
//! summary of what it has free, updated on every allocation and release:
//!
//! | index | key | used by |
//! |---|---|---|
//! | `by_numa` | largest free cores in one NUMA node, then total free cores (quantised, see [`MAX_NUMA_KEYS`]) | compact |
//! | `by_top2` | free cores in the two largest free NUMA nodes | compact over two NUMA nodes |
//! | `by_free` | free cores | scatter |
//! | `idle` | cores, for nodes with nothing in use | exclusive |
//! | `by_gpus` | free GPUs, for nodes that have GPUs | requests with GPUs |
//!
//! A compact request of `c` cores first walks `by_numa` upwards from "largest
//! free NUMA node holds `c`": the first node is the best fit. Only a node
//! whose large NUMA nodes lack memory is passed over. If no node has such a
//! NUMA node, the request must span: `by_top2` upwards from `c` gives the
//! best-fitting node where two NUMA nodes hold it. Failing that, nodes are
//! tried by their largest free NUMA node, largest first, and the one needing
//! the fewest NUMA nodes among the first [`SPAN_CANDIDATES`] that can hold it
//! wins (a node whose largest free NUMA node has `f` cores needs at least
//! `⌈c / f⌉`, which ends the search early). Requests with GPUs walk `by_gpus` instead, fewest free
//! GPUs first: GPU nodes are few, and GPUs are what such a request is short
//! of. [`Resources::allocate_with`] walks the same order, skipping the nodes
//! its filter refuses.

mod index;
mod node;
mod shape;
/// Slots already chosen for other chunks of the same request: a bitmap, so
/// that planning `k` chunks costs no `k`-long scan per candidate.
#[derive(Debug, Default)]
struct Picked {
    words: Vec<u64>,
}

impl Picked {
    fn insert(&mut self, slot: u32) {
        let w = slot as usize / 64;
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (slot % 64);
    }

    fn contains(&self, slot: u32) -> bool {
        self.words.get(slot as usize / 64).is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }
}

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use shape::NodeShape;

use index::BucketQueue;
use node::{NodeState, Plan};
use shape::Layout;

/// A node, numbered by the server in joining order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct NodeId(pub u32);

/// How the cores of one chunk are chosen on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Fewest NUMA nodes, then fewest L3 caches; memory from the same NUMA nodes.
    #[default]
    Compact,
    /// Spread over the node's NUMA nodes, for memory bandwidth.
    Scatter,
    /// The whole node.
    Exclusive,
}

/// What one task needs: `chunks` nodes, each with `cores` cores, `mem` bytes
/// and `gpus` GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRequest {
    /// Number of nodes (PBS `select=N` chunks). At least 1.
    pub chunks: u32,
    /// Cores per chunk. At least 1.
    pub cores: u32,
    /// Memory per chunk in bytes (0: not limited).
    pub mem: u64,
    /// GPUs per chunk.
    pub gpus: u32,
    /// How cores are chosen within a node.
    pub placement: Placement,
}

impl ResourceRequest {
    /// One chunk of `cores` cores, compact, no memory or GPUs.
    pub fn cores(cores: u32) -> Self {
        Self { chunks: 1, cores, mem: 0, gpus: 0, placement: Placement::Compact }
    }
}

/// What one chunk got on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAllocation {
    /// The node.
    pub node: NodeId,
    /// Indices of the cores taken, in the node's core order (ascending).
    pub cores: Vec<u32>,
    /// OS indices of the PUs of those cores (what the task is pinned to).
    pub pus: Vec<u32>,
    /// Memory taken per NUMA node: (NUMA OS index, bytes), in the node's
    /// NUMA order. Sums to the request's `mem`; an exclusive chunk holds all
    /// of the node's memory.
    pub mem: Vec<(u32, u64)>,
    /// Indices of the GPUs taken, ascending.
    pub gpus: Vec<u32>,
}

/// Everything one task got, one entry per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Per node.
    pub nodes: Vec<NodeAllocation>,
}

/// Size of the `by_numa` index: `(largest NUMA node + 1) × levels` keys stay
/// within this many. Total free cores have one level per count (exact best
/// fit) while `(cores in the largest NUMA node + 1) × (cores in the largest
/// node + 1)` is at most this, e.g. 255 cores in one NUMA node, or 8-core
/// NUMA nodes up to 7 280 cores; beyond, a level is a range of counts
/// (tested in `index_levels_are_exact_up_to_max_numa_keys`).
pub const MAX_NUMA_KEYS: u32 = 1 << 16;

/// A spanning compact request compares at most this many candidate nodes
/// (that can hold it) before taking the best seen.
pub const SPAN_CANDIDATES: usize = 16;

/// The index dimensions, grown to cover every shape ever added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Dims {
    /// Most cores in one NUMA node.
    max_dom: u32,
    /// Most cores in one node.
    max_cores: u32,
    /// Most GPUs in one node.
    max_gpus: u32,
    /// Levels of total free cores per `by_numa` key (see [`Dims::new`]).
    levels: u32,
}

impl Dims {
    fn new(max_dom: u32, max_cores: u32, max_gpus: u32) -> Self {
        // One level per free-core count when the index stays within
        // MAX_NUMA_KEYS, fewer (each a range of counts) beyond.
        let levels = (max_cores + 1).min((MAX_NUMA_KEYS / (max_dom + 1)).max(1));
        Dims { max_dom, max_cores, max_gpus, levels }
    }

    /// The level of `free` total free cores.
    #[inline]
    fn level(&self, free: u32) -> u32 {
        if self.levels == self.max_cores + 1 {
            free.min(self.max_cores)
        } else {
            (u64::from(free.min(self.max_cores)) * u64::from(self.levels) / (u64::from(self.max_cores) + 1))
                as u32
        }
    }

    /// The `by_numa` key of a node.
    #[inline]
    fn numa_key(&self, max_dom_free: u32, free: u32) -> u32 {
        max_dom_free * self.levels + self.level(free)
    }
}

/// Node ids below this are found through a table indexed by id (the server
/// numbers nodes from 0); others through the ordered map.
const DIRECT_IDS: u32 = 1 << 20;

/// Free and used resources of every node.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    /// Nodes by slot; `None` for a vacant slot.
    slots: Vec<Option<NodeState>>,
    /// Vacant slots, reused first.
    vacant: Vec<u32>,
    /// Slot of each node.
    ids: BTreeMap<NodeId, u32>,
    /// Slot of each node with an id below [`DIRECT_IDS`], by id (`u32::MAX`: none).
    slot_of: Vec<u32>,
    /// Each distinct shape, with the number of nodes that have it.
    layouts: Vec<(Arc<Layout>, u32)>,
    dims: Dims,
    by_numa: BucketQueue,
    by_top2: BucketQueue,
    by_free: BucketQueue,
    idle: BucketQueue,
    by_gpus: BucketQueue,
    free_cores: u64,
}

impl Resources {
    /// No nodes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a node, all of it free.
    ///
    /// Allocations made on a node before it was replaced must not be released
    /// afterwards: they would free the new node's cores.
    pub fn add_node(&mut self, id: NodeId, shape: NodeShape) {
        self.remove_node(id);
        let layout = match self.layouts.iter_mut().find(|(l, _)| l.shape == shape) {
            Some((l, n)) => {
                *n += 1;
                Arc::clone(l)
            }
            None => {
                let l = Arc::new(Layout::new(shape));
                self.layouts.push((Arc::clone(&l), 1));
                l
            }
        };
        let node = NodeState::new(id, Arc::clone(&layout));
        self.free_cores += u64::from(node.free_cores);
        let slot = match self.vacant.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(node);
                s
            }
            None => {
                self.slots.push(Some(node));
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(id, slot);
        if id.0 < DIRECT_IDS {
            if self.slot_of.len() <= id.0 as usize {
                self.slot_of.resize(id.0 as usize + 1, u32::MAX);
            }
            self.slot_of[id.0 as usize] = slot;
        }
        let dims = Dims::new(
            self.dims.max_dom.max(layout.max_dom_cores),
            self.dims.max_cores.max(layout.ncores),
            self.dims.max_gpus.max(layout.ngpus),
        );
        if dims != self.dims || self.by_numa.keys() == 0 {
            self.dims = dims;
            self.rebuild_index_cold();
        } else {
            self.reindex(slot, false);
        }
    }

    /// Removes a node; returns whether it was there.
    pub fn remove_node(&mut self, id: NodeId) -> bool {
        let Some(slot) = self.ids.remove(&id) else { return false };
        if let Some(s) = self.slot_of.get_mut(id.0 as usize) {
            *s = u32::MAX;
        }
        let node = self.slots[slot as usize].take().expect("indexed slot holds a node");
        self.free_cores -= u64::from(node.free_cores);
        for q in [&mut self.by_numa, &mut self.by_top2, &mut self.by_free, &mut self.idle, &mut self.by_gpus]
        {
            q.remove(slot);
        }
        self.vacant.push(slot);
        if let Some(i) = self.layouts.iter().position(|(l, _)| Arc::ptr_eq(l, &node.layout)) {
            self.layouts[i].1 -= 1;
            if self.layouts[i].1 == 0 {
                self.layouts.swap_remove(i);
            }
        }
        true
    }

    /// Free cores across all nodes.
    pub fn free_cores(&self) -> u64 {
        self.free_cores
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.ids.len()
    }

    /// Whether some set of nodes, all free, could hold `req`; the error names
    /// the largest node. With no nodes yet, every request is accepted.
    pub fn check_fits(&self, req: &ResourceRequest) -> Result<(), String> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let fits: u64 = self
            .layouts
            .iter()
            .filter(|(l, _)| l.ncores >= req.cores && l.memory >= req.mem && l.ngpus >= req.gpus)
            .map(|&(_, n)| u64::from(n))
            .sum();
        if fits >= u64::from(req.chunks) {
            return Ok(());
        }
        let largest = self
            .layouts
            .iter()
            .map(|(l, _)| l)
            .max_by_key(|l| (l.ncores, l.memory, l.ngpus))
            .expect("non-empty");
        Err(format!(
            "no node can ever run this job: it asks for {} core(s){}{} per node on {} node(s), and the largest node has {} cores, {} MiB of memory and {} GPUs",
            req.cores,
            if req.mem > 0 { format!(", {} MiB", req.mem >> 20) } else { String::new() },
            if req.gpus > 0 { format!(", {} GPUs", req.gpus) } else { String::new() },
            req.chunks,
            largest.ncores,
            largest.memory >> 20,
            largest.ngpus,
        ))
    }

    /// Allocates `req` now, or returns `None` without changing anything.
    pub fn allocate(&mut self, req: &ResourceRequest) -> Option<Allocation> {
        self.allocate_with(req, |_| true)
    }

    /// Allocates `req` on nodes `allowed` accepts, or returns `None`.
    ///
    /// `allowed` is asked only about nodes that could hold a chunk, in the
    /// order the index offers them, possibly more than once per node.
    pub fn allocate_with(
        &mut self,
        req: &ResourceRequest,
        mut allowed: impl FnMut(NodeId) -> bool,
    ) -> Option<Allocation> {
        if req.chunks == 1 {
            let (slot, plan) = self.find(req, &mut allowed, &Picked::default())?;
            let a = self.apply(slot, &plan, req.gpus);
            return Some(Allocation { nodes: vec![a] });
        }
        let picks = self.find_chunks(req, &mut allowed)?;
        let nodes = picks.iter().map(|(slot, plan)| self.apply(*slot, plan, req.gpus)).collect();
        Some(Allocation { nodes })
    }

    /// Whether [`Resources::allocate`] would succeed now (nothing changes).
    pub fn fits_now(&self, req: &ResourceRequest) -> bool {
        if req.chunks == 1 {
            return self.find(req, &mut |_| true, &Picked::default()).is_some();
        }
        self.find_chunks(req, &mut |_| true).is_some()
    }

    /// Plans `req.chunks` chunks on distinct nodes, without changing anything.
    fn find_chunks<F: FnMut(NodeId) -> bool>(
        &self,
        req: &ResourceRequest,
        allowed: &mut F,
    ) -> Option<Vec<(u32, Plan)>> {
        let mut picks: Vec<(u32, Plan)> = Vec::with_capacity(req.chunks as usize);
        let mut picked = Picked::default();
        for _ in 0..req.chunks {
            let pick = self.find(req, allowed, &picked)?;
            picked.insert(pick.0);
            picks.push(pick);
        }
        Some(picks)
    }

    /// Returns an allocation's resources. Chunks on nodes that are gone are
    /// skipped; a chunk naming resources its node does not have in use is
    /// skipped whole (and is a bug: it panics in debug builds).
    pub fn release(&mut self, alloc: &Allocation) {
        for a in &alloc.nodes {
            let Some(slot) = self.slot(a.node) else { continue };
            let node = self.slots[slot as usize].as_mut().expect("indexed slot holds a node");
            let before = node.free_cores;
            match node.release(a) {
                Ok(()) => {
                    self.free_cores += u64::from(node.free_cores - before);
                    self.reindex(slot, true);
                }
                Err(e) => debug_assert!(false, "releasing {a:?}: {e}"),
            }
        }
    }

    /// Takes exactly the resources of `alloc` (the inverse of
    /// [`Resources::release`]), for a task already running that the
    /// scheduler adopts. All or nothing: if a node is unknown or a resource
    /// is not free, nothing changes and the error says what.
    pub fn take(&mut self, alloc: &Allocation) -> Result<(), String> {
        for a in &alloc.nodes {
            let slot = self.slot(a.node).ok_or_else(|| format!("node {} is not known", a.node.0))?;
            let mut probe = self.node(slot).clone();
            probe.take(a)?;
        }
        for a in &alloc.nodes {
            let slot = self.slot(a.node).expect("checked above");
            let node = self.slots[slot as usize].as_mut().expect("indexed slot holds a node");
            let before = node.free_cores;
            node.take(a).expect("checked above");
            self.free_cores -= u64::from(before - node.free_cores);
            self.reindex(slot, true);
        }
        Ok(())
    }

    /// The allocation of a task pinned to `pus` of node `id` with `mem`
    /// bytes and `gpus`: the cores holding those PUs, and the memory on
    /// their NUMA nodes (first the first core's, then the others', as much as
    /// each has free). `None` if the node is unknown or a PU is not one of
    /// its PUs.
    pub fn allocation_of(&self, id: NodeId, pus: &[u32], mem: u64, gpus: &[u32]) -> Option<Allocation> {
        let slot = self.slot(id)?;
        let node = self.node(slot);
        let shape = self.shape(id)?;
        let mut cores = Vec::new();
        for &pu in pus {
            let c = shape.core_pus.iter().position(|p| p.contains(&pu))? as u32;
            if !cores.contains(&c) {
                cores.push(c);
            }
        }
        cores.sort_unstable();
        let mut doms: Vec<usize> = cores.iter().map(|&c| node.layout.core_dom[c as usize] as usize).collect();
        doms.dedup();
        doms.extend((0..node.layout.ndom()).filter(|d| !doms.contains(d)).collect::<Vec<_>>());
        let mut left = mem;
        let mut mem_of = Vec::new();
        for d in doms {
            if left == 0 {
                break;
            }
            let part = left.min(node.dom_mem[d]);
            if part > 0 {
                mem_of.push((d, part));
                left -= part;
            }
        }
        mem_of.sort_unstable();
        let os_of = |d: usize| shape.numa.get(d).map_or(0, |n| n.0);
        let mem = mem_of.into_iter().map(|(d, b)| (os_of(d), b)).collect();
        let pus = cores.iter().flat_map(|&c| shape.core_pus[c as usize].iter().copied()).collect();
        Some(Allocation { nodes: vec![NodeAllocation { node: id, cores, pus, mem, gpus: gpus.to_vec() }] })
    }

    /// `(free cores, free memory, free GPUs)` of a node.
    pub fn node_free(&self, id: NodeId) -> Option<(u32, u64, u32)> {
        let slot = self.slot(id)?;
        let n = self.node(slot);
        Some((n.free_cores, n.free_mem, n.free_gpus))
    }

    /// Free cores of each of the node's NUMA nodes, in `shape.numa` order.
    pub fn numa_free_cores(&self, id: NodeId) -> Option<&[u32]> {
        self.slot(id).map(|slot| self.node(slot).dom_free.as_slice())
    }

    /// Free memory of each of the node's NUMA nodes, in `shape.numa` order.
    pub fn numa_free_memory(&self, id: NodeId) -> Option<&[u64]> {
        self.slot(id).map(|slot| self.node(slot).dom_mem.as_slice())
    }

    /// The node's shape.
    pub fn shape(&self, id: NodeId) -> Option<&NodeShape> {
        self.slot(id).map(|slot| &self.node(slot).layout.shape)
    }

    /// Every node.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.ids.keys().copied()
    }

    /// Checks every invariant; panics with a description when one is broken:
    /// each node's bitmaps against its per-NUMA, per-L3 and total free counts
    /// and its memory and GPUs against capacity; each index's lists and
    /// bitmaps, and each node's keys in them; the shape counts; the cluster
    /// total.
    pub fn sanity_check(&self) {
        let mut total = 0;
        let mut per_layout = vec![0u32; self.layouts.len()];
        for (&id, &slot) in &self.ids {
            let n = self.slots[slot as usize]
                .as_ref()
                .unwrap_or_else(|| panic!("node {id:?}: slot {slot} is vacant"));
            assert_eq!(n.id, id, "slot {slot} holds another node");
            n.check();
            total += u64::from(n.free_cores);
            let l = self.layouts.iter().position(|(l, _)| Arc::ptr_eq(l, &n.layout));
            per_layout[l.unwrap_or_else(|| panic!("node {id:?}: shape not registered"))] += 1;
            let d = &self.dims;
            assert!(
                n.layout.max_dom_cores <= d.max_dom && n.layout.ncores <= d.max_cores,
                "node {id:?}: beyond dims"
            );
            assert_eq!(
                self.by_numa.key_of(slot),
                Some(d.numa_key(n.max_dom_free, n.free_cores)),
                "node {id:?}: by_numa key"
            );
            assert_eq!(self.by_top2.key_of(slot), Some(n.top2_free), "node {id:?}: by_top2 key");
            assert_eq!(self.by_free.key_of(slot), Some(n.free_cores), "node {id:?}: by_free key");
            let idle = n.is_idle().then_some(n.layout.ncores);
            assert_eq!(self.idle.key_of(slot), idle, "node {id:?}: idle index");
            let gpus = (n.layout.ngpus > 0).then_some(n.free_gpus);
            assert_eq!(self.by_gpus.key_of(slot), gpus, "node {id:?}: by_gpus key");
        }
        for (id, &slot) in self.slot_of.iter().enumerate() {
            let want = self.ids.get(&NodeId(id as u32)).copied().unwrap_or(u32::MAX);
            assert_eq!(slot, want, "direct slot table of node {id}");
        }
        for &slot in &self.vacant {
            assert!(self.slots[slot as usize].is_none(), "vacant slot {slot} holds a node");
        }
        assert_eq!(self.slots.iter().flatten().count(), self.ids.len(), "occupied slots vs ids");
        for (i, (_, n)) in self.layouts.iter().enumerate() {
            assert_eq!(*n, per_layout[i], "shape {i}: node count");
        }
        for (q, what) in [
            (&self.by_numa, "by_numa"),
            (&self.by_top2, "by_top2"),
            (&self.by_free, "by_free"),
            (&self.idle, "idle"),
            (&self.by_gpus, "by_gpus"),
        ] {
            q.check(what);
        }
        assert_eq!(self.by_numa.len(), self.ids.len(), "by_numa holds every node");
        assert_eq!(self.by_top2.len(), self.ids.len(), "by_top2 holds every node");
        assert_eq!(self.by_free.len(), self.ids.len(), "by_free holds every node");
        assert_eq!(total, self.free_cores, "cluster free core count");
    }

    /// The slot of node `id`.
    #[inline]
    fn slot(&self, id: NodeId) -> Option<u32> {
        match self.slot_of.get(id.0 as usize) {
            Some(&s) if s != u32::MAX => Some(s),
            Some(_) => None,
            None => self.ids.get(&id).copied(),
        }
    }

    #[inline]
    fn node(&self, slot: u32) -> &NodeState {
        self.slots[slot as usize].as_ref().expect("indexed slot holds a node")
    }

    /// Applies a plan found by [`Resources::find`] and updates the index.
    fn apply(&mut self, slot: u32, plan: &Plan, gpus: u32) -> NodeAllocation {
        let node = self.slots[slot as usize].as_mut().expect("indexed slot holds a node");
        let before = node.free_cores;
        let a = node.apply(plan, gpus);
        self.free_cores -= u64::from(before - node.free_cores);
        self.reindex(slot, true);
        a
    }

    /// Puts a node's keys into every index: first in its buckets after an
    /// allocation or release (`first`: among equally good nodes, the one
    /// changed last is offered first, which keeps churn on few nodes and
    /// the others untouched), last when it joins (nodes that join in id
    /// order are offered in id order).
    #[inline]
    fn reindex(&mut self, slot: u32, first: bool) {
        let n = self.slots[slot as usize].as_ref().expect("indexed slot holds a node");
        let put = |q: &mut BucketQueue, key: Option<u32>| match key {
            Some(k) if first => q.set(slot, k),
            Some(k) => q.push_back(slot, k),
            None => q.remove(slot),
        };
        put(&mut self.by_numa, Some(self.dims.numa_key(n.max_dom_free, n.free_cores)));
        put(&mut self.by_top2, Some(n.top2_free));
        put(&mut self.by_free, Some(n.free_cores));
        put(&mut self.idle, n.is_idle().then_some(n.layout.ncores));
        if n.layout.ngpus > 0 {
            put(&mut self.by_gpus, Some(n.free_gpus));
        }
    }

    /// Resizes the indexes to `self.dims` and puts every node back.
    #[cold]
    fn rebuild_index_cold(&mut self) {
        let d = self.dims;
        self.by_numa.set_keys((d.max_dom + 1) * d.levels);
        self.by_top2.set_keys(2 * d.max_dom + 1);
        self.by_free.set_keys(d.max_cores + 1);
        self.idle.set_keys(d.max_cores + 1);
        self.by_gpus.set_keys(d.max_gpus + 1);
        let slots: Vec<u32> = self.ids.values().copied().collect();
        for slot in slots {
            self.reindex(slot, false);
        }
    }

    /// Finds a node for one chunk of `req` (not one of `picked`) and plans it.
    fn find<F: FnMut(NodeId) -> bool>(
        &self,
        req: &ResourceRequest,
        allowed: &mut F,
        picked: &Picked,
    ) -> Option<(u32, Plan)> {
        let (c, m, g) = (req.cores, req.mem, req.gpus);
        let mut ok = |slot: u32, n: &NodeState| !picked.contains(slot) && allowed(n.id);
        match req.placement {
            Placement::Exclusive => self.idle.range(c, u32::MAX).find_map(|(_, slot)| {
                let n = self.node(slot);
                (n.layout.memory >= m && n.layout.ngpus >= g && ok(slot, n)).then_some((slot, Plan::Whole))
            }),
            Placement::Scatter => {
                let (index, from) = if g > 0 { (&self.by_gpus, g) } else { (&self.by_free, c) };
                for (_, slot) in index.range(from, u32::MAX) {
                    let n = self.node(slot);
                    if n.free_cores < c || n.free_mem < m || n.free_gpus < g {
                        continue;
                    }
                    if let Some(plan) = n.scatter_plan(c, m) {
                        if ok(slot, n) {
                            return Some((slot, plan));
                        }
                    }
                }
                None
            }
            Placement::Compact if g > 0 => self.find_compact_gpu(req, &mut ok),
            Placement::Compact => {
                // 1. Inside one NUMA node: the best fit first.
                let lo = u64::from(c) * u64::from(self.dims.levels);
                if lo < u64::from(self.by_numa.keys()) {
                    for (_, slot) in self.by_numa.range(lo as u32, u32::MAX) {
                        let n = self.node(slot);
                        if n.free_mem < m {
                            continue;
                        }
                        if let Some(dom) = n.best_domain(c, m, 0) {
                            if ok(slot, n) {
                                return Some((slot, Plan::Domain { dom, cores: c, mem: m }));
                            }
                        }
                    }
                }
                // 2. Across two NUMA nodes: the best fit first.
                for (_, slot) in self.by_top2.range(c, u32::MAX) {
                    let n = self.node(slot);
                    if n.free_mem < m {
                        continue;
                    }
                    if let Some(plan) = n.span_plan(c, m) {
                        if plan.domains() <= 2 && ok(slot, n) {
                            return Some((slot, plan));
                        }
                    }
                }
                // 3. Across more.
                self.find_spanning_cold(c, m, &mut ok)
            }
        }
    }

    /// A compact chunk that must span NUMA nodes: nodes by their largest free
    /// NUMA node, largest first; the fewest NUMA nodes among the first
    /// [`SPAN_CANDIDATES`] that can hold it.
    #[cold]
    fn find_spanning_cold(
        &self,
        c: u32,
        m: u64,
        ok: &mut impl FnMut(u32, &NodeState) -> bool,
    ) -> Option<(u32, Plan)> {
        let d = self.dims;
        let bound =
            |largest: u32| if largest == 0 { usize::MAX } else { c.div_ceil(largest).max(1) as usize };
        let mut best: Option<(usize, u32, Plan)> = None;
        let mut seen = 0;
        for largest in (0..=d.max_dom).rev() {
            if largest == 0 && c > 0 {
                break;
            }
            if best.as_ref().is_some_and(|b| b.0 <= bound(largest)) {
                break;
            }
            let base = largest * d.levels;
            for (_, slot) in self.by_numa.range(base + d.level(c), base + d.levels - 1) {
                let n = self.node(slot);
                if n.free_cores < c || n.free_mem < m {
                    continue;
                }
                seen += 1;
                if best.as_ref().is_some_and(|b| n.domains_for(c) >= b.0) {
                    if seen >= SPAN_CANDIDATES {
                        return best.map(|(_, s, p)| (s, p));
                    }
                    continue;
                }
                let Some(plan) = n.span_plan(c, m) else { continue };
                let k = plan.domains();
                if best.as_ref().is_none_or(|b| k < b.0) && ok(slot, n) {
                    if k <= bound(largest) {
                        return Some((slot, plan));
                    }
                    best = Some((k, slot, plan));
                }
                if seen >= SPAN_CANDIDATES && best.is_some() {
                    return best.map(|(_, s, p)| (s, p));
                }
            }
        }
        best.map(|(_, s, p)| (s, p))
    }

    /// A compact chunk with GPUs: nodes with enough free GPUs, fewest first;
    /// the first whose GPUs are local to a NUMA node that holds the chunk,
    /// else the first with such a NUMA node, else the first that can hold
    /// it at all.
    fn find_compact_gpu(
        &self,
        req: &ResourceRequest,
        ok: &mut impl FnMut(u32, &NodeState) -> bool,
    ) -> Option<(u32, Plan)> {
        let (c, m, g) = (req.cores, req.mem, req.gpus);
        let mut best: Option<(u8, u32, Plan)> = None;
        for (_, slot) in self.by_gpus.range(g, u32::MAX) {
            let n = self.node(slot);
            if n.free_cores < c || n.free_mem < m {
                continue;
            }
            let (score, plan) = if let Some(dom) = n.best_domain(c, m, g) {
                (0, Plan::Domain { dom, cores: c, mem: m })
            } else if best.as_ref().is_some_and(|b| b.0 <= 1) {
                continue;
            } else if let Some(dom) = n.best_domain(c, m, 0) {
                (1, Plan::Domain { dom, cores: c, mem: m })
            } else if best.is_some() {
                continue;
            } else if let Some(plan) = n.span_plan(c, m) {
                (2, plan)
            } else {
                continue;
            };
            if best.as_ref().is_none_or(|b| score < b.0) && ok(slot, n) {
                if score == 0 {
                    return Some((slot, plan));
                }
                best = Some((score, slot, plan));
            }
        }
        best.map(|(_, s, p)| (s, p))
    }
}
