//! Placement decisions per second: the scheduling core's resource model on a
//! large cluster, as a regression guard for the target of at least
//! 1 000 000 single-core placement decisions per second (goal 10 000 000).
//!
//! The cluster is [`NODES`] nodes of the 192-core, 24-NUMA-node machine in
//! `192em64t-24n8c2t.xml` (hwloc XML from the shared topologies directory:
//! `$PICLOUD_TOPOLOGIES`, else `../../shared/topologies` from this crate).
//! It is filled to a level with a deterministic mix of 1-, 2-, 4- and 8-core
//! compact requests, overshooting by [`OVERSHOOT`] and then releasing random
//! ones, so that free cores are scattered over the nodes as on a busy
//! cluster. Each measured iteration is one placement decision and its
//! release: `allocate` then `release` of the measured request, which leaves
//! the fill level where it was. Throughput is in decisions (elements) per
//! second.
//!
//! Run: `cargo bench -p picloud-bench --bench placement -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use picloud_scheduler::core::{Allocation, NodeId, NodeShape, ResourceRequest, Resources};

/// Nodes in the cluster.
const NODES: u32 = 1_000;

/// The topology of every node.
const TOPOLOGY: &str = "192em64t-24n8c2t.xml";

/// Fill levels measured, in percent of all cores.
const FILLS: [u32; 2] = [50, 95];

/// Cores per measured compact request.
const SIZES: [u32; 3] = [1, 8, 16];

/// How far past the fill level the cluster is filled before random
/// allocations are released back down to it, in percent.
const OVERSHOOT: u32 = 4;

/// Memory per filling core and per measured core (bytes), so that memory is
/// placed too.
const MEM_PER_CORE: u64 = 1 << 30;

/// The node shape, from the shared topology file.
fn shape() -> NodeShape {
    let dir = std::env::var_os("PICLOUD_TOPOLOGIES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/topologies"));
    let path = dir.join(TOPOLOGY);
    if !path.exists() {
        panic!(
            "the placement bench needs {}; set PICLOUD_TOPOLOGIES to the directory holding {TOPOLOGY}",
            path.display()
        );
    }
    let info = picloud_nodeagent::topology::from_xml_file(&path).unwrap_or_else(|e| panic!("{e}"));
    NodeShape::from_info(&info)
}

/// xorshift64 (Marsaglia, "Xorshift RNGs", 2003): deterministic filler choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A cluster whose used cores are `percent` % of all, in scattered pieces.
fn cluster(shape: &NodeShape, percent: u32) -> Resources {
    let mut r = Resources::new();
    for i in 0..NODES {
        r.add_node(NodeId(i), shape.clone());
    }
    let total = u64::from(NODES) * u64::from(shape.cores());
    let target_used = total * u64::from(percent) / 100;
    let overshoot = (total * u64::from((percent + OVERSHOOT).min(100)) / 100).max(target_used);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut live: Vec<Allocation> = Vec::new();
    while total - r.free_cores() < overshoot {
        let cores = [1, 2, 4, 8][(rng.next() % 4) as usize];
        let req = ResourceRequest { mem: u64::from(cores) * MEM_PER_CORE, ..ResourceRequest::cores(cores) };
        match r.allocate(&req) {
            Some(a) => live.push(a),
            None => break,
        }
    }
    while total - r.free_cores() > target_used {
        let a = live.swap_remove((rng.next() % live.len() as u64) as usize);
        r.release(&a);
    }
    r.sanity_check();
    r
}

fn placement(c: &mut Criterion) {
    let shape = shape();
    let mut group = c.benchmark_group("compact");
    group.throughput(Throughput::Elements(1));
    for percent in FILLS {
        let mut r = cluster(&shape, percent);
        for cores in SIZES {
            let req =
                ResourceRequest { mem: u64::from(cores) * MEM_PER_CORE, ..ResourceRequest::cores(cores) };
            let id = BenchmarkId::new(format!("{cores}-core"), format!("{percent}%-full"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    let a = r.allocate(black_box(&req)).unwrap_or_else(|| {
                        panic!("a {cores}-core request does not fit the {percent}%-full cluster")
                    });
                    r.release(black_box(&a));
                })
            });
            r.sanity_check();
        }
    }
    group.finish();
}

// `criterion_group!` makes an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, placement);
}
criterion_main!(group::benches);
