//! Unit tests of placement on real machine topologies (hwloc XML exports in
//! `shared/topologies`, loaded through the node agent's topology code) and
//! on synthetic shapes.

use std::path::PathBuf;

use super::*;

mod props;

/// GiB.
const GIB: u64 = 1 << 30;

/// Where the shared hwloc XML topologies are: `$PICLOUD_TOPOLOGIES`, else
/// `shared/topologies` beside the repository.
fn topologies_dir() -> PathBuf {
    std::env::var_os("PICLOUD_TOPOLOGIES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/topologies"))
}

/// The shape of a shared topology, or `None` (test skipped) when the file is
/// not there.
fn real(name: &str) -> Option<NodeShape> {
    let path = topologies_dir().join(name);
    if !path.exists() {
        eprintln!("skipping: {} is not present (set PICLOUD_TOPOLOGIES)", path.display());
        return None;
    }
    let info = picloud_nodeagent::topology::from_xml_file(&path).unwrap_or_else(|e| panic!("{e}"));
    Some(NodeShape::from_info(&info))
}

fn req(cores: u32, mem: u64, gpus: u32, placement: Placement) -> ResourceRequest {
    ResourceRequest { chunks: 1, cores, mem, gpus, placement }
}

fn compact(cores: u32) -> ResourceRequest {
    ResourceRequest::cores(cores)
}

fn one_node(shape: NodeShape) -> Resources {
    let mut r = Resources::new();
    r.add_node(NodeId(0), shape);
    r
}

/// The NUMA indices (into `shape.numa`) of an allocation's cores, sorted, deduplicated.
fn numa_of(shape: &NodeShape, a: &NodeAllocation) -> Vec<usize> {
    let mut d: Vec<usize> = a.cores.iter().map(|&c| shape.numa_of_core(c)).collect();
    d.sort_unstable();
    d.dedup();
    d
}

fn l3_of(shape: &NodeShape, a: &NodeAllocation) -> Vec<u32> {
    let mut l: Vec<u32> = a.cores.iter().map(|&c| shape.core_l3[c as usize]).collect();
    l.sort_unstable();
    l.dedup();
    l
}

fn alloc(r: &mut Resources, q: &ResourceRequest) -> NodeAllocation {
    let a = r.allocate(q).unwrap_or_else(|| panic!("{q:?} should fit"));
    r.sanity_check();
    assert_eq!(a.nodes.len(), 1);
    a.nodes.into_iter().next().unwrap()
}

#[test]
fn shape_of_the_large_smp_has_24_numa_nodes_of_8_cores_with_an_l3_each() {
    let Some(s) = real("192em64t-24n8c2t.xml") else { return };
    assert_eq!(s.cores(), 192);
    assert_eq!(s.numa.len(), 24);
    assert!(s.core_pus.iter().all(|p| p.len() == 2));
    for d in 0..24 {
        let cores: Vec<u32> = (0..192).filter(|&c| s.numa_of_core(c) == d).collect();
        assert_eq!(cores.len(), 8, "NUMA node {d}");
        let l3: Vec<u32> = cores.iter().map(|&c| s.core_l3[c as usize]).collect();
        assert!(l3.iter().all(|&l| l == l3[0]), "one L3 per NUMA node");
    }
    assert_eq!(s.gpus, 0);
    assert!(s.numa.iter().all(|&(_, m)| m > 0));
}

#[test]
fn shape_of_power8_places_two_gpus_on_each_numa_node() {
    let Some(s) = real("power8gpudistances.xml") else { return };
    assert_eq!(s.gpus, 4);
    assert_eq!(s.gpu_numa, [Some(0), Some(0), Some(1), Some(1)]);
    assert_eq!(s.numa.len(), 2);
}

#[test]
fn shape_of_a_cpuset_restricted_node_puts_orphan_cores_in_a_reported_numa_node() {
    // PUs 0-1 and 12-15 are allowed but their NUMA nodes are not reported.
    let Some(s) = real("16amd64-8n2c-cpusets.xml") else { return };
    assert_eq!(s.cores(), 10);
    assert_eq!(s.numa.len(), 5);
    assert!(s.core_numa.iter().all(|&d| (d as usize) < s.numa.len()));
    let mut r = one_node(s.clone());
    // Every core can be placed, and memory requests come from NUMA nodes that have it.
    for _ in 0..10 {
        alloc(&mut r, &req(1, 1 << 20, 0, Placement::Compact));
    }
    assert!(r.allocate(&compact(1)).is_none());
}

#[test]
fn shape_of_knl_keeps_memory_only_numa_nodes_usable_for_memory() {
    let Some(s) = real("64intel64-fakeKNL-SNC4-hybrid.xml") else { return };
    assert_eq!(s.numa.len(), 8);
    let with_cores: std::collections::BTreeSet<usize> = (0..s.cores()).map(|c| s.numa_of_core(c)).collect();
    assert_eq!(with_cores.len(), 4, "4 DRAM NUMA nodes have the cores, 4 MCDRAM nodes none");
    // More memory than all DRAM next to one SNC cluster: MCDRAM and the
    // other clusters' DRAM make up the rest, no NUMA node beyond its size.
    let dom = *with_cores.iter().next().unwrap();
    let want = s.numa[dom].1 + GIB;
    let mut r = one_node(s.clone());
    let a = alloc(&mut r, &req(2, want, 0, Placement::Compact));
    assert_eq!(a.mem.iter().map(|&(_, b)| b).sum::<u64>(), want);
    for &(os, b) in &a.mem {
        let cap = s.numa.iter().find(|&&(o, _)| o == os).unwrap().1;
        assert!(b <= cap);
    }
}

#[test]
fn compact_request_stays_in_one_numa_node_and_one_l3() {
    let Some(s) = real("192em64t-24n8c2t.xml") else { return };
    let mut r = one_node(s.clone());
    let a = alloc(&mut r, &req(4, GIB, 0, Placement::Compact));
    assert_eq!(a.cores.len(), 4);
    assert_eq!(numa_of(&s, &a).len(), 1);
    assert_eq!(l3_of(&s, &a).len(), 1);
    assert_eq!(a.pus.len(), 8, "pinned to both hardware threads of each core");
    let want: Vec<u32> = a.cores.iter().flat_map(|&c| s.core_pus[c as usize].clone()).collect();
    assert_eq!(a.pus, want);
    let dom = numa_of(&s, &a)[0];
    assert_eq!(a.mem, [(s.numa[dom].0, GIB)], "memory from the same NUMA node");
}

#[test]
fn compact_request_takes_the_best_fitting_numa_node() {
    let Some(s) = real("32em64t-2n8c2t-pci-normalio.xml") else { return };
    let mut r = one_node(s.clone());
    let six = alloc(&mut r, &compact(6));
    let first = numa_of(&s, &six);
    assert_eq!(first.len(), 1);
    // 2 cores: the NUMA node with 2 free beats the one with 8.
    let two = alloc(&mut r, &compact(2));
    assert_eq!(numa_of(&s, &two), first);
    // 3 cores: only the other one fits.
    let three = alloc(&mut r, &compact(3));
    assert_ne!(numa_of(&s, &three), first);
}

#[test]
fn compact_request_takes_the_best_fitting_l3_inside_its_numa_node() {
    // 1 NUMA node, 3 L3 caches of 4 cores.
    let s = NodeShape::uniform(1, 3, 4, 1, 8 * GIB);
    let mut r = one_node(s.clone());
    let a = alloc(&mut r, &compact(3)); // L3 0: 1 free left
    assert_eq!(l3_of(&s, &a), [0]);
    let b = alloc(&mut r, &compact(2)); // L3 1: 2 free left
    assert_eq!(l3_of(&s, &b), [1]);
    let c = alloc(&mut r, &compact(1));
    assert_eq!(l3_of(&s, &c), [0], "the L3 with 1 free core, not 2 or 4");
    let d = alloc(&mut r, &compact(2));
    assert_eq!(l3_of(&s, &d), [1]);
    // 6 cores fit in no single L3: the fewest L3s (the free one, then the rest).
    r.release(&Allocation { nodes: vec![a, c] });
    let e = alloc(&mut r, &compact(6));
    assert_eq!(l3_of(&s, &e).len(), 2);
}

#[test]
fn compact_request_larger_than_a_numa_node_spans_the_fewest_numa_nodes() {
    let Some(s) = real("192em64t-24n8c2t.xml") else { return };
    let mut r = one_node(s.clone());
    // Leave NUMA nodes with 7, 7, 7, ... free by taking one core from each.
    for _ in 0..24 {
        alloc(&mut r, &req(1, 0, 0, Placement::Scatter));
    }
    assert_eq!(r.numa_free_cores(NodeId(0)).unwrap(), [7; 24]);
    let a = alloc(&mut r, &req(16, 6 * GIB, 0, Placement::Compact));
    assert_eq!(numa_of(&s, &a).len(), 3, "16 cores from NUMA nodes of 7 free: 7 + 7 + 2");
    assert_eq!(a.mem.iter().map(|&(_, b)| b).sum::<u64>(), 6 * GIB);
    let used: Vec<u32> = numa_of(&s, &a).iter().map(|&d| s.numa[d].0).collect();
    assert!(a.mem.iter().all(|(os, _)| used.contains(os)), "memory from the NUMA nodes of its cores");
    assert!(a.mem.iter().all(|&(os, b)| b <= s.numa[os as usize].1));
}

#[test]
fn compact_request_prefers_a_node_where_two_numa_nodes_hold_it() {
    let s = NodeShape::uniform(4, 1, 8, 1, 8 * GIB);
    let mut r = Resources::new();
    r.add_node(NodeId(0), s.clone());
    r.add_node(NodeId(1), s.clone());
    // Node 0: NUMA nodes with 8, 3, 3, 3 free; node 1: 6, 6, 6, 6.
    for q in [compact(5), compact(5), compact(5)] {
        r.allocate_with(&q, |n| n == NodeId(0)).unwrap();
    }
    for _ in 0..8 {
        r.allocate_with(&req(1, 0, 0, Placement::Scatter), |n| n == NodeId(1)).unwrap();
    }
    let mut free0 = r.numa_free_cores(NodeId(0)).unwrap().to_vec();
    free0.sort_unstable();
    assert_eq!(free0, [3, 3, 3, 8]);
    assert_eq!(r.numa_free_cores(NodeId(1)).unwrap(), [6; 4]);
    // 12 cores: node 0 has the largest free NUMA node but needs 8 + 3 + 1.
    let a = alloc(&mut r, &compact(12));
    assert_eq!(a.node, NodeId(1));
    assert_eq!(numa_of(&s, &a).len(), 2);
}

#[test]
fn compact_memory_beyond_one_numa_node_is_split_over_several() {
    let Some(s) = real("32em64t-2n8c2t-pci-normalio.xml") else { return };
    let total = s.memory();
    let mut r = one_node(s.clone());
    let want = s.numa[0].1 + GIB;
    let a = alloc(&mut r, &req(1, want, 0, Placement::Compact));
    assert_eq!(a.mem.len(), 2);
    assert_eq!(a.mem.iter().map(|&(_, b)| b).sum::<u64>(), want);
    let (_, free_mem, _) = r.node_free(NodeId(0)).unwrap();
    assert_eq!(free_mem, total - want);
}

#[test]
fn compact_request_prefers_a_node_where_one_numa_node_fits() {
    let s = NodeShape::uniform(4, 1, 4, 1, 4 * GIB);
    let mut r = Resources::new();
    r.add_node(NodeId(0), s.clone());
    r.add_node(NodeId(1), s.clone());
    // Node 0: 3 free in every NUMA node (12 free); node 1: 4 free in one (4 free).
    for _ in 0..4 {
        let a = r.allocate_with(&req(1, 0, 0, Placement::Scatter), |n| n == NodeId(0)).unwrap();
        assert_eq!(a.nodes[0].node, NodeId(0));
    }
    r.allocate_with(&compact(12), |n| n == NodeId(1)).unwrap();
    // Among nodes where it fits, the smallest largest free NUMA node (best fit).
    let a = alloc(&mut r, &compact(2));
    assert_eq!(a.node, NodeId(0), "3 free in a NUMA node beats 4");
    // Node 0 has more free cores in all, but only node 1 holds 4 in one NUMA node.
    let a = alloc(&mut r, &compact(4));
    assert_eq!(a.node, NodeId(1));
    assert_eq!(numa_of(&s, &a).len(), 1);
}

#[test]
fn gpu_request_takes_cores_on_the_numa_node_of_its_gpus() {
    let Some(s) = real("power8gpudistances.xml") else { return };
    let mut r = one_node(s.clone());
    let a = alloc(&mut r, &req(1, GIB, 2, Placement::Compact));
    let dom = numa_of(&s, &a)[0];
    assert_eq!(a.gpus.len(), 2);
    assert!(a.gpus.iter().all(|&g| s.gpu_numa[g as usize] == Some(dom as u32)), "{a:?}");
    assert_eq!(a.mem, [(s.numa[dom].0, GIB)]);
    // The other NUMA node's GPUs go with cores there.
    let b = alloc(&mut r, &req(1, 0, 1, Placement::Compact));
    let dom_b = numa_of(&s, &b)[0];
    assert_ne!(dom_b, dom);
    assert_eq!(s.gpu_numa[b.gpus[0] as usize], Some(dom_b as u32));
    // The last free GPU is on dom_b's NUMA node: so are the cores.
    let c = alloc(&mut r, &req(1, 0, 1, Placement::Compact));
    assert_eq!(numa_of(&s, &c), [dom_b]);
    assert!(r.allocate(&req(1, 0, 1, Placement::Compact)).is_none(), "4 GPUs, all taken");
}

#[test]
fn scatter_deals_cores_round_robin_over_numa_nodes_with_memory_split_evenly() {
    let Some(s) = real("192em64t-24n8c2t.xml") else { return };
    let mut r = one_node(s.clone());
    let a = alloc(&mut r, &req(48, 24 * GIB, 0, Placement::Scatter));
    for d in 0..24 {
        let n = a.cores.iter().filter(|&&c| s.numa_of_core(c) == d).count();
        assert_eq!(n, 2, "NUMA node {d}");
    }
    assert_eq!(a.mem.len(), 24);
    assert!(a.mem.iter().all(|&(_, b)| b == GIB));
    let b = alloc(&mut r, &req(3, 3 * GIB, 0, Placement::Scatter));
    assert_eq!(numa_of(&s, &b).len(), 3);
    assert_eq!(b.mem.iter().map(|&(_, m)| m).collect::<Vec<_>>(), [GIB; 3]);
}

#[test]
fn scatter_spreads_over_l3_caches_within_a_numa_node() {
    let s = NodeShape::uniform(2, 2, 4, 1, GIB);
    let mut r = one_node(s.clone());
    let a = alloc(&mut r, &req(4, 0, 0, Placement::Scatter));
    assert_eq!(numa_of(&s, &a).len(), 2);
    assert_eq!(l3_of(&s, &a).len(), 4);
}

#[test]
fn exclusive_takes_a_whole_idle_node_and_only_an_idle_one() {
    let Some(s) = real("power8gpudistances.xml") else { return };
    let mut r = Resources::new();
    r.add_node(NodeId(0), s.clone());
    r.add_node(NodeId(1), s.clone());
    let small = alloc(&mut r, &compact(1));
    let small_node = small.node;
    let whole = alloc(&mut r, &req(1, 0, 0, Placement::Exclusive));
    assert_ne!(whole.node, small.node);
    assert_eq!(whole.cores, (0..s.cores()).collect::<Vec<_>>());
    assert_eq!(whole.pus.len(), 16);
    assert_eq!(whole.gpus, [0, 1, 2, 3]);
    assert_eq!(whole.mem, s.numa);
    assert!(r.allocate(&req(1, 0, 0, Placement::Exclusive)).is_none(), "the other node is in use");
    r.release(&Allocation { nodes: vec![small] });
    r.sanity_check();
    assert_eq!(alloc(&mut r, &req(1, 0, 0, Placement::Exclusive)).node, small_node);
}

#[test]
fn exclusive_takes_the_smallest_idle_node_that_holds_it() {
    let mut r = Resources::new();
    r.add_node(NodeId(0), NodeShape::simple(64, 64 * GIB));
    r.add_node(NodeId(1), NodeShape::simple(8, 8 * GIB));
    r.add_node(NodeId(2), NodeShape::simple(16, 16 * GIB));
    assert_eq!(alloc(&mut r, &req(1, 0, 0, Placement::Exclusive)).node, NodeId(1));
    assert_eq!(alloc(&mut r, &req(10, 0, 0, Placement::Exclusive)).node, NodeId(2));
    assert!(r.allocate(&req(1, 100 * GIB, 0, Placement::Exclusive)).is_none());
    assert_eq!(alloc(&mut r, &req(1, 0, 0, Placement::Exclusive)).node, NodeId(0));
}

#[test]
fn chunks_go_to_distinct_nodes_or_none_is_taken() {
    let mut r = Resources::new();
    for i in 0..3 {
        r.add_node(NodeId(i), NodeShape::simple(4, 4 * GIB));
    }
    let q = ResourceRequest { chunks: 3, cores: 2, mem: GIB, gpus: 0, placement: Placement::Compact };
    let a = r.allocate(&q).unwrap();
    let mut nodes: Vec<NodeId> = a.nodes.iter().map(|n| n.node).collect();
    nodes.sort();
    assert_eq!(nodes, [NodeId(0), NodeId(1), NodeId(2)]);
    r.sanity_check();
    let before = snapshot(&r);
    let q4 = ResourceRequest { chunks: 4, ..q };
    assert!(r.allocate(&q4).is_none(), "4 chunks on 3 nodes");
    assert!(!r.fits_now(&q4));
    assert_eq!(snapshot(&r), before, "nothing taken when a chunk does not fit");
    assert!(r.fits_now(&q));
}

#[test]
fn allocate_with_skips_refused_nodes() {
    let mut r = Resources::new();
    for i in 0..4 {
        r.add_node(NodeId(i), NodeShape::simple(4, GIB));
    }
    let a = r.allocate_with(&compact(1), |n| n == NodeId(2)).unwrap();
    assert_eq!(a.nodes[0].node, NodeId(2));
    assert!(r.allocate_with(&compact(1), |_| false).is_none());
    r.sanity_check();
}

#[test]
fn allocation_asks_only_about_nodes_that_could_hold_it() {
    let shape = NodeShape::uniform(2, 1, 4, 1, GIB);
    let mut r = Resources::new();
    for i in 0..1000 {
        r.add_node(NodeId(i), shape.clone());
    }
    // Fill all but node 500.
    for i in 0..1000 {
        if i != 500 {
            r.allocate_with(&req(8, 0, 0, Placement::Exclusive), |n| n == NodeId(i)).unwrap();
        }
    }
    r.sanity_check();
    let mut asked = Vec::new();
    let a = r.allocate_with(&compact(3), |n| {
        asked.push(n);
        true
    });
    assert_eq!(a.unwrap().nodes[0].node, NodeId(500));
    assert_eq!(asked, [NodeId(500)], "full nodes are not visited");
    let mut asked = 0;
    assert!(
        r.allocate_with(&compact(6), |_| {
            asked += 1;
            true
        })
        .is_none()
    );
    assert_eq!(asked, 0);
}

#[test]
fn check_fits_names_the_largest_node() {
    let mut r = Resources::new();
    assert!(r.check_fits(&compact(10_000)).is_ok(), "no nodes yet: accept");
    r.add_node(NodeId(0), NodeShape::simple(8, 16 * GIB).with_gpus(vec![None, None]));
    r.add_node(NodeId(1), NodeShape::simple(4, 64 * GIB));
    assert!(r.check_fits(&compact(8)).is_ok());
    let err = r.check_fits(&compact(9)).unwrap_err();
    assert!(err.contains("largest node has 8 cores, 16384 MiB of memory and 2 GPUs"), "{err}");
    assert!(r.check_fits(&req(1, 64 * GIB, 0, Placement::Compact)).is_ok());
    assert!(r.check_fits(&req(1, 65 * GIB, 0, Placement::Compact)).is_err());
    assert!(r.check_fits(&req(1, 0, 2, Placement::Compact)).is_ok());
    assert!(r.check_fits(&req(1, 0, 3, Placement::Compact)).unwrap_err().contains("3 GPUs"));
    let two = ResourceRequest { chunks: 2, ..compact(4) };
    assert!(r.check_fits(&two).is_ok());
    let two_big = ResourceRequest { chunks: 2, ..compact(5) };
    assert!(r.check_fits(&two_big).unwrap_err().contains("on 2 node(s)"));
    r.remove_node(NodeId(0));
    assert!(r.check_fits(&compact(5)).is_err());
}

/// Everything free, node by node: the observable state.
type Snapshot = Vec<(NodeId, Vec<u64>, Vec<u32>, Vec<u64>, u32, u64, u32)>;

fn snapshot(r: &Resources) -> Snapshot {
    r.ids
        .iter()
        .map(|(&id, &slot)| {
            let n = r.node(slot);
            (id, n.free.clone(), n.dom_free.clone(), n.dom_mem.clone(), n.free_cores, n.free_mem, n.free_gpus)
        })
        .collect()
}

#[test]
fn release_restores_the_state_exactly() {
    let Some(s) = real("power8gpudistances.xml") else { return };
    let mut r = Resources::new();
    r.add_node(NodeId(0), s.clone());
    r.add_node(NodeId(1), s);
    alloc(&mut r, &req(3, GIB, 1, Placement::Compact));
    let before = snapshot(&r);
    let free = r.free_cores();
    for q in [
        req(5, 100 * GIB, 2, Placement::Compact),
        req(4, GIB, 1, Placement::Scatter),
        req(1, 0, 0, Placement::Exclusive),
        ResourceRequest { chunks: 2, ..req(2, GIB, 1, Placement::Compact) },
    ] {
        let a = r.allocate(&q).unwrap();
        r.sanity_check();
        r.release(&a);
        r.sanity_check();
        assert_eq!(snapshot(&r), before, "{q:?}");
        assert_eq!(r.free_cores(), free);
    }
}

#[test]
fn release_after_the_node_left_is_ignored() {
    let mut r = Resources::new();
    r.add_node(NodeId(0), NodeShape::simple(4, GIB));
    r.add_node(NodeId(1), NodeShape::simple(4, GIB));
    let q = ResourceRequest { chunks: 2, ..compact(2) };
    let a = r.allocate(&q).unwrap();
    assert!(r.remove_node(NodeId(0)));
    assert!(!r.remove_node(NodeId(0)));
    r.release(&a);
    r.sanity_check();
    assert_eq!(r.free_cores(), 4);
    assert_eq!(r.node_ids().collect::<Vec<_>>(), [NodeId(1)]);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "not in use")]
fn releasing_twice_is_caught_in_debug_builds() {
    let mut r = one_node(NodeShape::simple(4, GIB));
    let a = r.allocate(&compact(2)).unwrap();
    r.release(&a);
    r.release(&a);
}

#[test]
fn replacing_a_node_and_new_shapes_keep_the_index_consistent() {
    let mut r = Resources::new();
    r.add_node(NodeId(7), NodeShape::simple(2, GIB));
    alloc(&mut r, &compact(1));
    // A larger shape grows the index; the existing node keeps its state.
    r.add_node(NodeId(8), NodeShape::uniform(2, 2, 64, 2, GIB));
    r.sanity_check();
    assert_eq!(r.node_free(NodeId(7)).unwrap().0, 1);
    r.add_node(NodeId(7), NodeShape::simple(3, GIB));
    r.sanity_check();
    assert_eq!(r.node_free(NodeId(7)), Some((3, GIB, 0)));
    assert_eq!(r.free_cores(), 3 + 256);
    let big = alloc(&mut r, &compact(100));
    assert_eq!(big.node, NodeId(8));
    assert_eq!(big.cores.len(), 100);
    assert_eq!(r.shape(NodeId(7)), Some(&NodeShape::simple(3, GIB)));
    assert_eq!(r.node_count(), 2);
}

#[test]
fn nodes_without_memory_information_still_take_core_only_requests() {
    let mut s = NodeShape::simple(4, 0);
    s.numa.clear();
    let mut r = one_node(s);
    let a = alloc(&mut r, &compact(2));
    assert!(a.mem.is_empty());
    assert!(r.allocate(&req(1, 1, 0, Placement::Compact)).is_none());
    assert!(r.check_fits(&req(1, 1, 0, Placement::Compact)).is_err());
}

#[test]
fn node_with_more_than_64_cores_uses_several_bitmap_words() {
    let s = NodeShape::uniform(2, 3, 25, 1, GIB);
    let mut r = one_node(s.clone());
    let mut taken = Vec::new();
    // Seven in each NUMA node of 75 cores...
    for _ in 0..14 {
        let a = alloc(&mut r, &compact(10));
        assert_eq!(numa_of(&s, &a).len(), 1);
        taken.extend(a.cores);
    }
    // ... and the 5 + 5 left over.
    let a = alloc(&mut r, &compact(10));
    assert_eq!(numa_of(&s, &a).len(), 2);
    taken.extend(a.cores);
    taken.sort_unstable();
    assert_eq!(taken, (0..150).collect::<Vec<_>>());
}

#[test]
fn index_levels_are_exact_up_to_max_numa_keys() {
    for (max_dom, max_cores) in [(255, 255), (8, 7_280), (0, 0), (24, 192)] {
        let d = Dims::new(max_dom, max_cores, 0);
        assert_eq!(d.levels, max_cores + 1, "{max_dom} / {max_cores}");
        assert!((max_dom + 1) * d.levels <= MAX_NUMA_KEYS);
        assert!((0..=max_cores).all(|f| d.level(f) == f));
    }
    for (max_dom, max_cores) in [(256, 256), (8, 7_281), (1_024, 4_096)] {
        let d = Dims::new(max_dom, max_cores, 0);
        assert!(d.levels < max_cores + 1, "{max_dom} / {max_cores} quantised");
        assert!((max_dom + 1) * d.levels <= MAX_NUMA_KEYS);
        let levels: Vec<u32> = (0..=max_cores).map(|f| d.level(f)).collect();
        assert!(levels.windows(2).all(|w| w[0] <= w[1]), "monotone");
        assert_eq!(*levels.last().unwrap(), d.levels - 1);
        assert_eq!(d.numa_key(max_dom, max_cores), (max_dom + 1) * d.levels - 1, "last key in range");
    }
}
