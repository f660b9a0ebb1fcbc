//! Property tests: random sequences of node changes, allocations and releases
//! on random and real shapes, checked against a model of what is in use.
//!
//! After every step: `sanity_check`; no core, byte or GPU is handed out twice
//! or beyond capacity; an allocation is exactly what was asked (cores, PUs of
//! those cores, memory summing to the request, GPUs, distinct nodes); an
//! allocation fails only when no node (or not enough nodes) could hold it; a
//! compact chunk stays in one NUMA node whenever some node has one with the
//! free cores and memory (and enough free GPUs); releasing restores the state
//! exactly.

use std::collections::HashMap;
use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;

/// Shared topologies small enough to run many cases on, loaded once.
fn real_shapes() -> &'static [NodeShape] {
    static SHAPES: OnceLock<Vec<NodeShape>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        [
            "power8gpudistances.xml",
            "32em64t-2n8c2t-pci-normalio.xml",
            "16amd64-8n2c-cpusets.xml",
            "64intel64-fakeKNL-SNC4-hybrid.xml",
            "16em64t-4s2c2t.xml",
            "192em64t-24n8c2t.xml",
        ]
        .iter()
        .filter_map(|name| real(name))
        .collect()
    })
}

/// An irregular node: cores scattered over NUMA nodes and L3s in any order,
/// NUMA nodes with no cores or no memory, GPUs with or without a NUMA node,
/// sometimes more than 64 cores.
fn random_shape() -> impl Strategy<Value = NodeShape> {
    (1usize..=4, 1u32..=80, 1u32..=2, 0usize..=3)
        .prop_flat_map(|(numa, cores, pus, gpus)| {
            (
                prop::collection::vec(0..numa as u32, cores as usize),
                prop::collection::vec(0u32..3, cores as usize),
                prop::collection::vec(prop_oneof![Just(0u64), 1u64..=64], numa),
                prop::collection::vec(prop::option::of(0..numa as u32), gpus),
                Just((numa, cores, pus)),
            )
        })
        .prop_map(|(core_numa, core_l3, mem, gpu_numa, (numa, cores, pus))| NodeShape {
            core_pus: (0..cores).map(|c| (0..pus).map(|t| c + t * cores).collect()).collect(),
            core_numa,
            // OS indices need not be 0..n.
            numa: (0..numa).map(|d| (d as u32 * 2 + 1, mem[d] << 20)).collect(),
            gpus: gpu_numa.len() as u32,
            core_l3,
            core_package: Vec::new(),
            gpu_numa,
        })
}

fn any_shape() -> impl Strategy<Value = NodeShape> {
    let real = real_shapes().to_vec();
    if real.is_empty() {
        return random_shape().boxed();
    }
    prop_oneof![2 => random_shape(), 1 => prop::sample::select(real)].boxed()
}

#[derive(Debug, Clone)]
enum Op {
    Allocate(ResourceRequest),
    /// Allocate, release at once, and compare with the state before.
    Roundtrip(ResourceRequest),
    /// Release the live allocation at this position (modulo their number).
    Release(usize),
    /// Remove the node at this position (modulo their number).
    RemoveNode(usize),
    AddNode(NodeShape),
}

fn request() -> impl Strategy<Value = ResourceRequest> {
    (
        prop_oneof![6 => Just(1u32), 1 => Just(2u32)],
        prop_oneof![3 => 1u32..=4, 2 => 1u32..=24, 1 => 0u32..=200],
        prop_oneof![3 => Just(0u64), 2 => (1u64..=96).prop_map(|m| m << 20), 1 => (1u64..=200).prop_map(|g| g << 30)],
        prop_oneof![4 => Just(0u32), 1 => 1u32..=3],
        prop_oneof![4 => Just(Placement::Compact), 2 => Just(Placement::Scatter), 1 => Just(Placement::Exclusive)],
    )
        .prop_map(|(chunks, cores, mem, gpus, placement)| ResourceRequest { chunks, cores, mem, gpus, placement })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => request().prop_map(Op::Allocate),
        2 => request().prop_map(Op::Roundtrip),
        6 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::RemoveNode),
        1 => any_shape().prop_map(Op::AddNode),
    ]
}

/// What the model says is in use on one node.
struct Used {
    shape: NodeShape,
    cores: Vec<bool>,
    /// Per NUMA index.
    mem: Vec<u64>,
    gpus: Vec<bool>,
}

impl Used {
    fn new(shape: NodeShape) -> Self {
        Used {
            cores: vec![false; shape.cores() as usize],
            mem: vec![0; shape.numa.len()],
            gpus: vec![false; shape.gpus as usize],
            shape,
        }
    }

    fn free_cores(&self) -> u32 {
        self.cores.iter().filter(|&&u| !u).count() as u32
    }

    fn free_mem(&self) -> u64 {
        self.shape.memory() - self.mem.iter().sum::<u64>()
    }

    fn free_gpus(&self) -> u32 {
        self.gpus.iter().filter(|&&u| !u).count() as u32
    }

    fn idle(&self) -> bool {
        self.free_cores() == self.shape.cores()
            && self.free_mem() == self.shape.memory()
            && self.free_gpus() == self.shape.gpus
    }

    /// Whether one chunk of `q` could be placed here now.
    fn could_hold(&self, q: &ResourceRequest) -> bool {
        match q.placement {
            Placement::Exclusive => {
                self.idle()
                    && self.shape.cores() >= q.cores
                    && self.shape.memory() >= q.mem
                    && self.shape.gpus >= q.gpus
            }
            _ => self.free_cores() >= q.cores && self.free_mem() >= q.mem && self.free_gpus() >= q.gpus,
        }
    }

    /// Whether one NUMA node has `q.cores` free cores and `q.mem` free bytes
    /// (and the node `q.gpus` free GPUs).
    fn one_numa_holds(&self, q: &ResourceRequest) -> bool {
        self.free_gpus() >= q.gpus
            && (0..self.shape.numa_nodes()).any(|d| {
                let free = (0..self.shape.cores())
                    .filter(|&c| self.shape.numa_of_core(c) == d && !self.cores[c as usize])
                    .count() as u32;
                let mem_free =
                    self.shape.numa.get(d).map_or(0, |n| n.1) - self.mem.get(d).copied().unwrap_or(0);
                free >= q.cores && mem_free >= q.mem
            })
    }

    fn numa_index(&self, os: u32) -> usize {
        self.shape
            .numa
            .iter()
            .position(|&(o, _)| o == os)
            .unwrap_or_else(|| panic!("unknown NUMA OS index {os}"))
    }

    /// Marks a chunk used, checking that none of it was.
    fn take(&mut self, a: &NodeAllocation) {
        for &c in &a.cores {
            assert!(
                !std::mem::replace(&mut self.cores[c as usize], true),
                "core {c} of {:?} given twice",
                a.node
            );
        }
        for &(os, b) in &a.mem {
            let d = self.numa_index(os);
            self.mem[d] += b;
            assert!(self.mem[d] <= self.shape.numa[d].1, "NUMA node {os} of {:?} beyond capacity", a.node);
        }
        for &g in &a.gpus {
            assert!(
                !std::mem::replace(&mut self.gpus[g as usize], true),
                "GPU {g} of {:?} given twice",
                a.node
            );
        }
    }

    fn give_back(&mut self, a: &NodeAllocation) {
        a.cores.iter().for_each(|&c| self.cores[c as usize] = false);
        for &(os, b) in &a.mem {
            let d = self.numa_index(os);
            self.mem[d] -= b;
        }
        a.gpus.iter().for_each(|&g| self.gpus[g as usize] = false);
    }
}

/// Checks one allocation against its request and the state before it.
fn check_allocation(q: &ResourceRequest, a: &Allocation, model: &HashMap<NodeId, Used>) {
    assert_eq!(a.nodes.len(), q.chunks as usize);
    let mut nodes: Vec<NodeId> = a.nodes.iter().map(|n| n.node).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), a.nodes.len(), "two chunks on one node: {a:?}");
    for n in &a.nodes {
        let used = &model[&n.node];
        let shape = &used.shape;
        assert!(n.cores.windows(2).all(|w| w[0] < w[1]), "cores sorted and distinct: {n:?}");
        let pus: Vec<u32> = n.cores.iter().flat_map(|&c| shape.core_pus[c as usize].clone()).collect();
        assert_eq!(n.pus, pus, "pinned to exactly the PUs of its cores");
        assert!(n.gpus.windows(2).all(|w| w[0] < w[1]));
        assert!(n.mem.iter().all(|&(_, b)| b > 0));
        let mem: u64 = n.mem.iter().map(|&(_, b)| b).sum();
        if q.placement == Placement::Exclusive {
            assert_eq!(n.cores.len() as u32, shape.cores());
            assert_eq!(mem, shape.memory());
            assert_eq!(n.gpus.len() as u32, shape.gpus);
        } else {
            assert_eq!(n.cores.len() as u32, q.cores);
            assert_eq!(mem, q.mem);
            assert_eq!(n.gpus.len() as u32, q.gpus);
        }
        if q.placement == Placement::Compact && q.chunks == 1 && model.values().any(|u| u.one_numa_holds(q)) {
            let mut doms: Vec<usize> = n.cores.iter().map(|&c| shape.numa_of_core(c)).collect();
            doms.extend(n.mem.iter().map(|&(os, _)| used.numa_index(os)));
            doms.sort_unstable();
            doms.dedup();
            assert!(doms.len() <= 1, "{q:?} fits in one NUMA node but got {doms:?}: {n:?}");
        }
    }
}

fn run(shapes: Vec<NodeShape>, ops: Vec<Op>) {
    let mut r = Resources::new();
    let mut model: HashMap<NodeId, Used> = HashMap::new();
    let mut next_id = 0;
    for s in shapes {
        r.add_node(NodeId(next_id), s.clone());
        model.insert(NodeId(next_id), Used::new(s));
        next_id += 1;
    }
    let fresh = |model: &HashMap<NodeId, Used>| {
        let mut r = Resources::new();
        for (&id, u) in model {
            r.add_node(id, u.shape.clone());
        }
        snapshot(&r)
    };
    r.sanity_check();
    let mut live: Vec<Allocation> = Vec::new();
    for op in ops {
        let roundtrip = matches!(op, Op::Roundtrip(_));
        match op {
            Op::Allocate(q) | Op::Roundtrip(q) => {
                let before = snapshot(&r);
                let holders = model.values().filter(|u| u.could_hold(&q)).count();
                assert_eq!(r.fits_now(&q), holders >= q.chunks as usize, "fits_now {q:?}");
                let got = r.allocate(&q);
                r.sanity_check();
                let Some(a) = got else {
                    assert!(
                        holders < q.chunks as usize,
                        "{q:?} failed but {holders} node(s) could hold a chunk"
                    );
                    assert_eq!(snapshot(&r), before, "a failed allocation changed the state");
                    continue;
                };
                check_allocation(&q, &a, &model);
                for n in &a.nodes {
                    model.get_mut(&n.node).unwrap().take(n);
                }
                if roundtrip {
                    r.release(&a);
                    r.sanity_check();
                    assert_eq!(snapshot(&r), before, "release did not restore {q:?} -> {a:?}");
                    for n in &a.nodes {
                        model.get_mut(&n.node).unwrap().give_back(n);
                    }
                } else {
                    live.push(a);
                }
            }
            Op::Release(i) if !live.is_empty() => {
                let a = live.swap_remove(i % live.len());
                r.release(&a);
                r.sanity_check();
                for n in &a.nodes {
                    model.get_mut(&n.node).unwrap().give_back(n);
                }
            }
            Op::RemoveNode(i) if !model.is_empty() => {
                let mut ids: Vec<NodeId> = model.keys().copied().collect();
                ids.sort();
                let id = ids[i % ids.len()];
                assert!(r.remove_node(id));
                model.remove(&id);
                // What ran there has ended; its chunks elsewhere are released.
                for a in &mut live {
                    a.nodes.retain(|n| n.node != id);
                }
                r.sanity_check();
            }
            Op::AddNode(s) => {
                r.add_node(NodeId(next_id), s.clone());
                model.insert(NodeId(next_id), Used::new(s));
                next_id += 1;
                r.sanity_check();
            }
            _ => {}
        }
        let total: u64 = model.values().map(|u| u64::from(u.free_cores())).sum();
        assert_eq!(r.free_cores(), total, "free cores vs model");
        for (&id, u) in &model {
            assert_eq!(r.node_free(id), Some((u.free_cores(), u.free_mem(), u.free_gpus())), "node {id:?}");
        }
    }
    for a in live.drain(..) {
        r.release(&a);
    }
    r.sanity_check();
    assert_eq!(snapshot(&r), fresh(&model), "everything released: all free");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn random_allocations_and_releases_keep_every_invariant(
        shapes in prop::collection::vec(any_shape(), 1..=4),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(shapes, ops);
    }

    #[test]
    fn many_small_nodes_under_churn_keep_every_invariant(
        shapes in prop::collection::vec(random_shape(), 5..=24),
        ops in prop::collection::vec(op(), 50..150),
    ) {
        run(shapes, ops);
    }
}
