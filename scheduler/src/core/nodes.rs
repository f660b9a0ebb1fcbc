//! Nodes and their free cores. Free cores are a bitmap per node, so finding
//! `n` free cores is a scan of a few words.

use std::collections::BTreeMap;

/// A node, numbered by the server in joining order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

#[derive(Debug)]
struct Node {
    /// Each core as the OS indices of its PUs.
    cores: Vec<Vec<u32>>,
    /// Bit `c` set when core `c` is free.
    free: Vec<u64>,
    free_count: u32,
    memory: u64,
    free_memory: u64,
}

impl Node {
    fn take(&mut self, n: u32) -> Vec<usize> {
        let mut taken = Vec::with_capacity(n as usize);
        for (w, word) in self.free.iter_mut().enumerate() {
            while *word != 0 && taken.len() < n as usize {
                let bit = word.trailing_zeros() as usize;
                *word &= !(1u64 << bit);
                taken.push(w * 64 + bit);
            }
            if taken.len() == n as usize {
                break;
            }
        }
        debug_assert_eq!(taken.len(), n as usize, "caller checked free_count");
        self.free_count -= n;
        taken
    }
}

/// All nodes.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    nodes: BTreeMap<NodeId, Node>,
    free_cores: u64,
}

impl Nodes {
    pub(crate) fn add(&mut self, id: NodeId, cores: Vec<Vec<u32>>, memory: u64) {
        let n = cores.len();
        let mut free = vec![!0u64; n.div_ceil(64)];
        if n % 64 != 0 {
            *free.last_mut().expect("at least one word") = (1u64 << (n % 64)) - 1;
        }
        if n == 0 {
            free.clear();
        }
        self.free_cores += n as u64;
        let node = Node { cores, free, free_count: n as u32, memory, free_memory: memory };
        if let Some(old) = self.nodes.insert(id, node) {
            self.free_cores -= u64::from(old.free_count);
        }
    }

    pub(crate) fn remove(&mut self, id: NodeId) {
        if let Some(old) = self.nodes.remove(&id) {
            self.free_cores -= u64::from(old.free_count);
        }
    }

    pub(crate) fn free_cores(&self) -> u64 {
        self.free_cores
    }

    pub(crate) fn check_fits(&self, ncpus: u32, mem: Option<u64>) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        let fits = |n: &Node| n.cores.len() >= ncpus as usize && mem.is_none_or(|m| m <= n.memory);
        if self.nodes.values().any(fits) {
            return Ok(());
        }
        let largest = self.nodes.values().max_by_key(|n| (n.cores.len(), n.memory)).expect("non-empty");
        Err(format!(
            "no node can ever run this job: it asks for {ncpus} cores{}, and the largest node has {} cores and {} MiB of memory",
            mem.map(|m| format!(" and {} MiB of memory", m >> 20)).unwrap_or_default(),
            largest.cores.len(),
            largest.memory >> 20,
        ))
    }

    /// First fit: the first node with `ncpus` free cores and the memory.
    /// Returns the node and the OS indices of the PUs of the cores taken.
    pub(crate) fn allocate(&mut self, ncpus: u32, mem: Option<u64>) -> Option<(NodeId, Vec<u32>)> {
        let need_mem = mem.unwrap_or(0);
        let (&id, node) =
            self.nodes.iter_mut().find(|(_, n)| n.free_count >= ncpus && n.free_memory >= need_mem)?;
        let cores = node.take(ncpus);
        node.free_memory -= need_mem;
        self.free_cores -= u64::from(ncpus);
        let pus = cores.iter().flat_map(|&c| node.cores[c].iter().copied()).collect();
        Some((id, pus))
    }

    /// Returns the cores holding `pus` and the memory to the node.
    pub(crate) fn release(&mut self, id: NodeId, pus: &[u32], mem: Option<u64>) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        for (c, core_pus) in node.cores.iter().enumerate() {
            if core_pus.first().is_some_and(|p| pus.contains(p)) {
                let bit = 1u64 << (c % 64);
                debug_assert!(node.free[c / 64] & bit == 0, "core {c} released twice");
                node.free[c / 64] |= bit;
                node.free_count += 1;
                self.free_cores += 1;
            }
        }
        node.free_memory = (node.free_memory + mem.unwrap_or(0)).min(node.memory);
    }
}
