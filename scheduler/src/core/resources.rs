//! Resources of the cluster and their placement.
//!
//! [`NodeShape`] describes a node's hardware as the core sees it; [`Resources`]
//! holds every node's free cores, memory and GPUs and answers
//! [`Resources::allocate`] with an [`Allocation`] that names exactly which
//! cores (and their PUs), how much memory on which NUMA node, and which GPUs.
//!
//! (Placement here is plain first fit; topology-aware placement replaces it
//! behind the same interface.)

use std::collections::BTreeMap;

use picloud_proto::NodeInfo;

/// A node, numbered by the server in joining order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Indices of the cores taken, in the node's core order.
    pub cores: Vec<u32>,
    /// OS indices of the PUs of those cores (what the task is pinned to).
    pub pus: Vec<u32>,
    /// Memory taken per NUMA node: (NUMA OS index, bytes).
    pub mem: Vec<(u32, u64)>,
    /// Indices of the GPUs taken.
    pub gpus: Vec<u32>,
}

/// Everything one task got, one entry per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Per node.
    pub nodes: Vec<NodeAllocation>,
}

/// A node's hardware as the scheduler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeShape {
    /// Each core's PUs (OS indices).
    pub core_pus: Vec<Vec<u32>>,
    /// Each core's NUMA node, as an index into `numa`.
    pub core_numa: Vec<u32>,
    /// NUMA nodes: (OS index, memory bytes).
    pub numa: Vec<(u32, u64)>,
    /// Number of GPUs.
    pub gpus: u32,
}

impl NodeShape {
    /// The shape of a node an agent reported.
    pub fn from_info(info: &NodeInfo) -> Self {
        let core_numa = info
            .cores
            .iter()
            .map(|pus| {
                let first = pus.first().copied();
                info.numa_nodes.iter().position(|n| first.is_some_and(|p| n.pus.contains(&p))).unwrap_or(0)
                    as u32
            })
            .collect();
        let mut numa: Vec<(u32, u64)> = info.numa_nodes.iter().map(|n| (n.os_index, n.memory)).collect();
        if numa.is_empty() {
            numa.push((0, info.memory));
        }
        NodeShape { core_pus: info.cores.clone(), core_numa, numa, gpus: 0 }
    }

    /// `cores` cores of one PU each on one NUMA node with `memory` bytes.
    pub fn simple(cores: u32, memory: u64) -> Self {
        NodeShape {
            core_pus: (0..cores).map(|c| vec![c]).collect(),
            core_numa: vec![0; cores as usize],
            numa: vec![(0, memory)],
            gpus: 0,
        }
    }

    /// Number of cores.
    pub fn cores(&self) -> u32 {
        self.core_pus.len() as u32
    }

    /// Total memory in bytes.
    pub fn memory(&self) -> u64 {
        self.numa.iter().map(|&(_, m)| m).sum()
    }
}

#[derive(Debug)]
struct NodeState {
    shape: NodeShape,
    free: Vec<bool>,
    free_cores: u32,
    free_mem: u64,
}

/// Free and used resources of every node.
#[derive(Debug, Default)]
pub struct Resources {
    nodes: BTreeMap<NodeId, NodeState>,
    free_cores: u64,
}

impl Resources {
    /// No nodes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a node, all of it free.
    pub fn add_node(&mut self, id: NodeId, shape: NodeShape) {
        self.remove_node(id);
        let n = shape.cores();
        self.free_cores += u64::from(n);
        let free_mem = shape.memory();
        self.nodes.insert(id, NodeState { free: vec![true; n as usize], free_cores: n, free_mem, shape });
    }

    /// Removes a node; returns whether it was there.
    pub fn remove_node(&mut self, id: NodeId) -> bool {
        match self.nodes.remove(&id) {
            Some(old) => {
                self.free_cores -= u64::from(old.free_cores);
                true
            }
            None => false,
        }
    }

    /// Free cores across all nodes.
    pub fn free_cores(&self) -> u64 {
        self.free_cores
    }

    /// Whether some set of nodes, all free, could hold `req`; the error names
    /// the largest node.
    pub fn check_fits(&self, req: &ResourceRequest) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        let fits = self
            .nodes
            .values()
            .filter(|n| {
                n.shape.cores() >= req.cores && n.shape.memory() >= req.mem && n.shape.gpus >= req.gpus
            })
            .count();
        if fits >= req.chunks as usize {
            return Ok(());
        }
        let largest =
            self.nodes.values().max_by_key(|n| (n.shape.cores(), n.shape.memory())).expect("non-empty");
        Err(format!(
            "no node can ever run this job: it asks for {} core(s){}{} per node on {} node(s), and the largest node has {} cores, {} MiB of memory and {} GPUs",
            req.cores,
            if req.mem > 0 { format!(", {} MiB", req.mem >> 20) } else { String::new() },
            if req.gpus > 0 { format!(", {} GPUs", req.gpus) } else { String::new() },
            req.chunks,
            largest.shape.cores(),
            largest.shape.memory() >> 20,
            largest.shape.gpus,
        ))
    }

    /// Allocates `req` now, or returns `None` without changing anything.
    pub fn allocate(&mut self, req: &ResourceRequest) -> Option<Allocation> {
        self.allocate_with(req, |_| true)
    }

    /// Allocates `req` on nodes `allowed` accepts, or returns `None`.
    pub fn allocate_with(
        &mut self,
        req: &ResourceRequest,
        mut allowed: impl FnMut(NodeId) -> bool,
    ) -> Option<Allocation> {
        let chosen: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.free_cores >= req.cores && n.free_mem >= req.mem)
            .map(|(&id, _)| id)
            .filter(|&id| allowed(id))
            .take(req.chunks as usize)
            .collect();
        if chosen.len() < req.chunks as usize {
            return None;
        }
        let mut nodes = Vec::with_capacity(chosen.len());
        for id in chosen {
            let n = self.nodes.get_mut(&id).expect("chosen");
            let cores: Vec<u32> =
                (0..n.free.len()).filter(|&c| n.free[c]).take(req.cores as usize).map(|c| c as u32).collect();
            for &c in &cores {
                n.free[c as usize] = false;
            }
            n.free_cores -= req.cores;
            n.free_mem -= req.mem;
            let pus = cores.iter().flat_map(|&c| n.shape.core_pus[c as usize].iter().copied()).collect();
            let mem = if req.mem > 0 { vec![(n.shape.numa[0].0, req.mem)] } else { Vec::new() };
            nodes.push(NodeAllocation { node: id, cores, pus, mem, gpus: Vec::new() });
        }
        self.free_cores -= u64::from(req.cores) * u64::from(req.chunks);
        Some(Allocation { nodes })
    }

    /// Returns an allocation's resources.
    pub fn release(&mut self, alloc: &Allocation) {
        for a in &alloc.nodes {
            let Some(n) = self.nodes.get_mut(&a.node) else { continue };
            for &c in &a.cores {
                debug_assert!(!n.free[c as usize], "core {c} released twice");
                n.free[c as usize] = true;
            }
            n.free_cores += a.cores.len() as u32;
            self.free_cores += a.cores.len() as u64;
            n.free_mem += a.mem.iter().map(|&(_, m)| m).sum::<u64>();
        }
    }

    /// `(free cores, free memory, free GPUs)` of a node.
    pub fn node_free(&self, id: NodeId) -> Option<(u32, u64, u32)> {
        self.nodes.get(&id).map(|n| (n.free_cores, n.free_mem, 0))
    }

    /// The node's shape.
    pub fn shape(&self, id: NodeId) -> Option<&NodeShape> {
        self.nodes.get(&id).map(|n| &n.shape)
    }

    /// Every node.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied()
    }

    /// Checks every invariant; panics with a description when one is broken.
    pub fn sanity_check(&self) {
        let mut total = 0;
        for (id, n) in &self.nodes {
            let free = n.free.iter().filter(|&&f| f).count() as u32;
            assert_eq!(free, n.free_cores, "node {id:?}: free core count");
            assert!(n.free_mem <= n.shape.memory(), "node {id:?}: free memory above capacity");
            total += u64::from(free);
        }
        assert_eq!(total, self.free_cores, "cluster free core count");
    }
}
