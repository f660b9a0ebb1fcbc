//! A node's hardware as the scheduler sees it ([`NodeShape`]), and the masks
//! derived from it once per distinct shape ([`Layout`]).
//!
//! The unit of placement is the core. Cores are grouped twice: by NUMA node
//! (a *domain*: its cores and its memory) and, within a domain, by L3 cache
//! (a *group*: the cores of one domain that share one L3). When an L3 lies
//! inside one NUMA node, as on most machines, a group is exactly one L3; when
//! an L3 spans NUMA nodes (sub-NUMA clustering) it is cut at NUMA boundaries.
//! Machines without L3 information get one group per domain.

use std::collections::{BTreeMap, HashMap};

use picloud_proto::NodeInfo;

/// A node's hardware as the scheduler needs it.
///
/// The first four fields are the original shape; the others refine it and may
/// be left empty (or shorter than their counterparts), which means "unknown":
/// every core then shares L3 cache 0 and package 0, and GPUs have no NUMA
/// affinity. Out-of-range NUMA indices count as NUMA node 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeShape {
    /// Each core's PUs (OS indices).
    pub core_pus: Vec<Vec<u32>>,
    /// Each core's NUMA node, as an index into `numa`.
    pub core_numa: Vec<u32>,
    /// NUMA nodes: (OS index, memory bytes). NUMA nodes no core names hold
    /// memory only (e.g. KNL's MCDRAM).
    pub numa: Vec<(u32, u64)>,
    /// Number of GPUs.
    pub gpus: u32,
    /// Each core's L3 cache, as an index (cores with equal values share one).
    pub core_l3: Vec<u32>,
    /// Each core's package (socket), as an index.
    pub core_package: Vec<u32>,
    /// Each GPU's NUMA node, as an index into `numa`, when it is local to one.
    pub gpu_numa: Vec<Option<u32>>,
}

impl NodeShape {
    /// The shape of a node an agent reported.
    ///
    /// A core belongs to the NUMA node, L3 cache and package holding its first
    /// PU. A core whose NUMA node is not reported (hwloc drops NUMA nodes
    /// outside the agent's allowed nodeset but may keep their PUs) is counted
    /// in the NUMA node of another core of its package, else the first NUMA
    /// node that has cores. When no NUMA node reports memory, the node's total
    /// memory is split evenly over the NUMA nodes that have cores.
    pub fn from_info(info: &NodeInfo) -> Self {
        let ncores = info.cores.len();
        let mut numa: Vec<(u32, u64)> = info.numa_nodes.iter().map(|n| (n.os_index, n.memory)).collect();
        if numa.is_empty() {
            numa.push((0, info.memory));
        }
        let index_of = |sets: &mut dyn Iterator<Item = &Vec<u32>>| -> HashMap<u32, u32> {
            let mut map = HashMap::new();
            for (i, pus) in sets.enumerate() {
                for &pu in pus {
                    map.entry(pu).or_insert(i as u32);
                }
            }
            map
        };
        let pu_numa = index_of(&mut info.numa_nodes.iter().map(|n| &n.pus));
        let pu_l3 = index_of(&mut info.l3.iter());
        let pu_package = index_of(&mut info.package_pus.iter());
        let of_core = |map: &HashMap<u32, u32>, pus: &Vec<u32>| pus.first().and_then(|p| map.get(p)).copied();

        let core_l3 =
            info.cores.iter().map(|pus| of_core(&pu_l3, pus).unwrap_or(info.l3.len() as u32)).collect();
        let core_package: Vec<u32> = info
            .cores
            .iter()
            .map(|pus| of_core(&pu_package, pus).unwrap_or(info.package_pus.len() as u32))
            .collect();
        let known: Vec<Option<u32>> = info.cores.iter().map(|pus| of_core(&pu_numa, pus)).collect();
        let first_with_cores = known.iter().flatten().copied().min().unwrap_or(0);
        let core_numa: Vec<u32> = (0..ncores)
            .map(|c| {
                known[c].unwrap_or_else(|| {
                    (0..ncores)
                        .filter(|&o| core_package[o] == core_package[c])
                        .find_map(|o| known[o])
                        .unwrap_or(first_with_cores)
                })
            })
            .collect();

        if numa.iter().all(|&(_, m)| m == 0) && info.memory > 0 {
            let mut with_cores: Vec<usize> = core_numa.iter().map(|&d| d as usize).collect();
            with_cores.sort_unstable();
            with_cores.dedup();
            if with_cores.is_empty() {
                with_cores.push(0);
            }
            let n = with_cores.len() as u64;
            for (i, &d) in with_cores.iter().enumerate() {
                numa[d].1 = info.memory / n + u64::from((i as u64) < info.memory % n);
            }
        }

        let os_to_numa: HashMap<u32, u32> =
            numa.iter().enumerate().map(|(i, &(os, _))| (os, i as u32)).collect();
        let gpu_numa = info.gpus.iter().map(|g| g.numa.and_then(|os| os_to_numa.get(&os).copied())).collect();
        NodeShape {
            core_pus: info.cores.clone(),
            core_numa,
            numa,
            gpus: info.gpus.len() as u32,
            core_l3,
            core_package,
            gpu_numa,
        }
    }

    /// `cores` cores of one PU each on one NUMA node with `memory` bytes.
    pub fn simple(cores: u32, memory: u64) -> Self {
        NodeShape {
            core_pus: (0..cores).map(|c| vec![c]).collect(),
            core_numa: vec![0; cores as usize],
            numa: vec![(0, memory)],
            gpus: 0,
            core_l3: Vec::new(),
            core_package: Vec::new(),
            gpu_numa: Vec::new(),
        }
    }

    /// A regular node: `numa` NUMA nodes (OS indices `0..numa`, one package
    /// each) of `l3_per_numa` L3 caches of `cores_per_l3` cores, each core
    /// with `pus_per_core` PUs numbered consecutively, and `mem_per_numa`
    /// bytes per NUMA node. No GPUs.
    pub fn uniform(
        numa: u32,
        l3_per_numa: u32,
        cores_per_l3: u32,
        pus_per_core: u32,
        mem_per_numa: u64,
    ) -> Self {
        let cores = numa * l3_per_numa * cores_per_l3;
        NodeShape {
            core_pus: (0..cores).map(|c| (c * pus_per_core..(c + 1) * pus_per_core).collect()).collect(),
            core_numa: (0..cores).map(|c| c / (l3_per_numa * cores_per_l3)).collect(),
            numa: (0..numa).map(|n| (n, mem_per_numa)).collect(),
            gpus: 0,
            core_l3: (0..cores).map(|c| c / cores_per_l3).collect(),
            core_package: (0..cores).map(|c| c / (l3_per_numa * cores_per_l3)).collect(),
            gpu_numa: Vec::new(),
        }
    }

    /// This shape with GPUs: one per entry, local to that NUMA node (index
    /// into `numa`) or to none.
    pub fn with_gpus(mut self, gpu_numa: Vec<Option<u32>>) -> Self {
        self.gpus = gpu_numa.len() as u32;
        self.gpu_numa = gpu_numa;
        self
    }

    /// Number of cores.
    pub fn cores(&self) -> u32 {
        self.core_pus.len() as u32
    }

    /// Total memory in bytes.
    pub fn memory(&self) -> u64 {
        self.numa.iter().map(|&(_, m)| m).sum()
    }

    /// Number of NUMA nodes (at least 1: a shape without any has one
    /// memoryless NUMA node 0).
    pub fn numa_nodes(&self) -> usize {
        self.numa.len().max(1)
    }

    /// Index into `numa` of core `core`'s NUMA node.
    pub fn numa_of_core(&self, core: u32) -> usize {
        let d = self.core_numa.get(core as usize).copied().unwrap_or(0) as usize;
        if d < self.numa_nodes() { d } else { 0 }
    }
}

/// NUMA OS indices below this are looked up in a table; others (unusual) by
/// a search.
const DIRECT_OS_INDICES: u32 = 1 << 12;

/// Bitmap words needed for `bits` bits.
pub(super) fn words_for(bits: u32) -> usize {
    (bits as usize).div_ceil(64)
}

/// Masks and maps derived from a [`NodeShape`], shared by every node of that
/// shape. Domains are NUMA nodes (indices into `shape.numa`); groups are the
/// L3 slices of a domain, numbered domain by domain.
#[derive(Debug)]
pub(super) struct Layout {
    pub(super) shape: NodeShape,
    /// Words per core bitmap.
    pub(super) words: usize,
    pub(super) ncores: u32,
    pub(super) ngpus: u32,
    pub(super) memory: u64,
    /// All cores.
    pub(super) all: Vec<u64>,
    /// Each domain's cores, `words` words per domain.
    pub(super) dom_mask: Vec<u64>,
    pub(super) dom_cores: Vec<u32>,
    /// Each domain's memory.
    pub(super) dom_cap: Vec<u64>,
    /// Each domain's NUMA OS index.
    pub(super) dom_os: Vec<u32>,
    /// Domain of each NUMA OS index below [`DIRECT_OS_INDICES`] (`u32::MAX`:
    /// none), so that releasing memory does not search `dom_os`.
    dom_by_os: Vec<u32>,
    /// Each domain's package (that of its first core; `u32::MAX` if coreless).
    pub(super) dom_package: Vec<u32>,
    /// Each domain's groups: `start..end`.
    pub(super) dom_groups: Vec<(u32, u32)>,
    /// Each group's cores, `words` words per group.
    pub(super) grp_mask: Vec<u64>,
    pub(super) grp_cores: Vec<u32>,
    pub(super) grp_dom: Vec<u32>,
    pub(super) core_grp: Vec<u32>,
    pub(super) core_dom: Vec<u32>,
    /// Each GPU's domain, if local to one.
    pub(super) gpu_dom: Vec<Option<u32>>,
    /// Most cores in one domain.
    pub(super) max_dom_cores: u32,
    /// Most PUs of one core.
    pub(super) max_pus_per_core: usize,
}

impl Layout {
    pub(super) fn new(shape: NodeShape) -> Self {
        let ncores = shape.cores();
        let words = words_for(ncores);
        let ndom = shape.numa_nodes();
        let core_dom: Vec<u32> = (0..ncores).map(|c| shape.numa_of_core(c) as u32).collect();
        // Groups: (domain, L3) pairs in domain order, then L3 order.
        let mut groups: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
        for c in 0..ncores {
            let l3 = shape.core_l3.get(c as usize).copied().unwrap_or(0);
            groups.entry((core_dom[c as usize], l3)).or_default().push(c);
        }
        let mut dom_groups = vec![(0u32, 0u32); ndom];
        let mut grp_mask = vec![0u64; groups.len() * words];
        let mut grp_cores = Vec::with_capacity(groups.len());
        let mut grp_dom = Vec::with_capacity(groups.len());
        let mut core_grp = vec![0u32; ncores as usize];
        for (g, (&(d, _), cores)) in groups.iter().enumerate() {
            let g32 = g as u32;
            let range = &mut dom_groups[d as usize];
            if range.1 == range.0 {
                *range = (g32, g32);
            }
            range.1 = g32 + 1;
            for &c in cores {
                grp_mask[g * words + (c / 64) as usize] |= 1 << (c % 64);
                core_grp[c as usize] = g32;
            }
            grp_cores.push(cores.len() as u32);
            grp_dom.push(d);
        }
        let mut dom_mask = vec![0u64; ndom * words];
        let mut dom_cores = vec![0u32; ndom];
        let mut dom_package = vec![u32::MAX; ndom];
        for c in 0..ncores {
            let d = core_dom[c as usize] as usize;
            dom_mask[d * words + (c / 64) as usize] |= 1 << (c % 64);
            dom_cores[d] += 1;
            if dom_package[d] == u32::MAX {
                dom_package[d] = shape.core_package.get(c as usize).copied().unwrap_or(0);
            }
        }
        let mut all = vec![0u64; words];
        for c in 0..ncores {
            all[(c / 64) as usize] |= 1 << (c % 64);
        }
        let (dom_os, dom_cap): (Vec<u32>, Vec<u64>) =
            if shape.numa.is_empty() { (vec![0], vec![0]) } else { shape.numa.iter().copied().unzip() };
        let table =
            dom_os.iter().copied().filter(|&os| os < DIRECT_OS_INDICES).max().map_or(0, |m| m as usize + 1);
        let mut dom_by_os = vec![u32::MAX; table];
        for (d, &os) in dom_os.iter().enumerate().rev() {
            if os < DIRECT_OS_INDICES {
                dom_by_os[os as usize] = d as u32;
            }
        }
        let gpu_dom = (0..shape.gpus as usize)
            .map(|i| shape.gpu_numa.get(i).copied().flatten().filter(|&d| (d as usize) < ndom))
            .collect();
        Layout {
            words,
            ncores,
            ngpus: shape.gpus,
            memory: dom_cap.iter().sum(),
            all,
            max_dom_cores: dom_cores.iter().copied().max().unwrap_or(0),
            max_pus_per_core: shape.core_pus.iter().map(Vec::len).max().unwrap_or(0),
            dom_mask,
            dom_cores,
            dom_cap,
            dom_os,
            dom_by_os,
            dom_package,
            dom_groups,
            grp_mask,
            grp_cores,
            grp_dom,
            core_grp,
            core_dom,
            gpu_dom,
            shape,
        }
    }

    /// Number of domains (NUMA nodes).
    pub(super) fn ndom(&self) -> usize {
        self.dom_cores.len()
    }

    /// The domain of NUMA OS index `os`.
    #[inline]
    pub(super) fn dom_of_os(&self, os: u32) -> Option<usize> {
        match self.dom_by_os.get(os as usize) {
            Some(&d) if d != u32::MAX => Some(d as usize),
            Some(_) => None,
            None => self.dom_os.iter().position(|&o| o == os),
        }
    }

    /// Domain `d`'s core mask.
    #[inline]
    pub(super) fn dom_mask(&self, d: usize) -> &[u64] {
        &self.dom_mask[d * self.words..(d + 1) * self.words]
    }

    /// Group `g`'s core mask.
    #[inline]
    pub(super) fn grp_mask(&self, g: usize) -> &[u64] {
        &self.grp_mask[g * self.words..(g + 1) * self.words]
    }
}
