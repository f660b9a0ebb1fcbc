//! Hardware discovery: turns an hwloc topology into the [`NodeInfo`] an agent
//! announces to the server.
//!
//! The topology comes either from the live machine ([`discover`]) or from an
//! hwloc XML export ([`from_xml_file`], used to test placement on machines we
//! do not have). hwloc already drops the PUs and NUMA nodes this process may not
//! use (its "allowed" sets, e.g. a cpuset cgroup), so what is reported here is
//! what jobs can be pinned to:
//!
//! - NUMA nodes by OS index, each with the OS indices of its PUs (possibly none,
//!   for memory-only nodes such as KNL's MCDRAM) and its local memory (0 when
//!   hwloc has no memory information for it);
//! - cores in hwloc's logical order, each as the OS indices of its PUs; a
//!   topology without core objects gets one "core" per PU;
//! - total memory, number of packages, and which limits the agent enforces;
//! - packages and L3 caches, each as the OS indices of its PUs (the scheduler
//!   places compact jobs within as few of them as it can);
//! - GPUs, one per physical device. hwloc shows a device once per API that
//!   sees it (an NVIDIA board is `cuda0`, `nvml0` and `opencl0d0`), all as I/O
//!   children of the same PCI device, so OS devices are grouped by their PCI
//!   parent. Only compute APIs count (CUDA, NVML, RSMI, Level Zero, OpenCL
//!   GPU devices); display-only devices (DRM `card0`, GL `:0.0`) are not
//!   GPUs a job can use. A GPU's NUMA node is the one in the nodeset of its
//!   first non-I/O ancestor, hwloc's definition of an I/O device's locality.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use hwlocality::Topology;
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::topology::builder::{FileInputError, TypeFilter};
use picloud_proto::{GpuInfo, NodeInfo, NumaNode};

/// What a discovered node says of the limits it enforces until the agent,
/// which knows whether it may create cgroups, says better.
pub const LIMITS: &str = "none: not known before the agent starts";

/// Why the node's topology could not be discovered.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// hwloc failed to discover the live machine.
    #[error("cannot discover this machine's topology with hwloc: {0}")]
    Live(String),
    /// An XML topology file could not be read or is not a valid hwloc export.
    #[error("cannot load the hwloc topology file {}: {reason}", path.display())]
    XmlFile {
        /// The file given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The topology holds no processing unit this process may use.
    #[error("the topology of {source_name} has no usable processing unit")]
    NoPus {
        /// Where the topology came from (`this machine` or a file).
        source_name: String,
    },
    /// The host name could not be read.
    #[error("cannot read the host name: {0}")]
    Hostname(#[source] nix::Error),
}

/// Discovers the live machine's topology.
pub fn discover() -> Result<NodeInfo, TopologyError> {
    let topology = guard_hwloc(|| {
        Topology::builder()
            // I/O objects are off by default; GPUs are OS devices.
            .with_io_type_filter(TypeFilter::KeepImportant)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())
    })
    .map_err(TopologyError::Live)?
    .map_err(TopologyError::Live)?;
    node_info(&topology, "this machine")
}

/// Loads a topology from an hwloc XML export (`lstopo --of xml`).
pub fn from_xml_file(path: &Path) -> Result<NodeInfo, TopologyError> {
    let fail = |reason: String| TopologyError::XmlFile { path: path.to_path_buf(), reason };
    // Check readability ourselves: hwloc reports a missing file with an errno
    // that hwlocality does not expect, and it would say less than io::Error does.
    std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let topology = guard_hwloc(|| {
        Topology::builder()
            .from_xml_file(path)
            .map_err(|e| match e {
                FileInputError::Invalid(_) => "not a valid hwloc XML topology".to_string(),
                other => other.to_string(),
            })?
            // I/O objects are filtered out of XML input too unless asked for.
            .with_io_type_filter(TypeFilter::KeepImportant)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| format!("not a valid hwloc XML topology ({e})"))
    })
    .map_err(&fail)?
    .map_err(fail)?;
    node_info(&topology, &path.display().to_string())
}

/// Runs an hwlocality call, turning a panic into an error message.
///
/// hwlocality treats hwloc errno values it does not expect as bugs and panics
/// (`unreachable!` in `TopologyBuilder::from_xml_file`); a bad input file must
/// give the operator an error, not bring the agent down.
fn guard_hwloc<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown error");
        format!("hwloc failed: {what}")
    })
}

/// Builds the [`NodeInfo`] of a loaded topology.
fn node_info(topology: &Topology, source_name: &str) -> Result<NodeInfo, TopologyError> {
    let mut numa_nodes: Vec<NumaNode> = topology
        .objects_with_type(ObjectType::NUMANode)
        .map(|node| NumaNode {
            os_index: os_index(node),
            pus: pus_of(node),
            memory: match node.attributes() {
                Some(ObjectAttributes::NUMANode(attr)) => attr.local_memory().map_or(0, |m| m.get()),
                _ => 0,
            },
        })
        .collect();
    numa_nodes.sort_by_key(|n| n.os_index);

    // `objects_with_type` yields objects in logical-index order.
    let mut cores: Vec<Vec<u32>> =
        topology.objects_with_type(ObjectType::Core).map(pus_of).filter(|pus| !pus.is_empty()).collect();
    if cores.is_empty() {
        // Some platforms expose no core objects: treat each PU as a core.
        cores = topology.objects_with_type(ObjectType::PU).map(|pu| vec![os_index(pu)]).collect();
    }
    if cores.is_empty() {
        return Err(TopologyError::NoPus { source_name: source_name.to_string() });
    }

    let memory = match topology.root_object().total_memory() {
        0 => numa_nodes.iter().map(|n| n.memory).sum(),
        m => m,
    };
    let package_pus: Vec<Vec<u32>> =
        topology.objects_with_type(ObjectType::Package).map(pus_of).filter(|pus| !pus.is_empty()).collect();
    let packages = topology.objects_with_type(ObjectType::Package).len() as u32;
    let l3: Vec<Vec<u32>> =
        topology.objects_with_type(ObjectType::L3Cache).map(pus_of).filter(|pus| !pus.is_empty()).collect();
    let gpus = gpus(topology, &numa_nodes);
    Ok(NodeInfo {
        hostname: hostname()?,
        numa_nodes,
        cores,
        memory,
        packages,
        limits: LIMITS.to_string(),
        package_pus,
        l3,
        gpus,
    })
}

/// The APIs whose OS devices are compute GPUs, most preferred name first.
const GPU_APIS: [&str; 5] = ["CUDA", "NVML", "RSMI", "LevelZero", "OpenCL"];

/// Where a GPU sits: its PCI domain, bus, device and function, or
/// `(u32::MAX, 0, 0, 0, hwloc's global index)` off PCI.
type GpuKey = (u32, u8, u8, u8, u64);

/// The node's GPUs, one per physical device, in PCI bus order (devices
/// without a PCI parent last, in hwloc's order).
fn gpus(topology: &Topology, numa_nodes: &[NumaNode]) -> Vec<GpuInfo> {
    let mut devices: BTreeMap<GpuKey, (usize, GpuInfo)> = BTreeMap::new();
    for osdev in topology.objects_with_type(ObjectType::OSDevice) {
        let Some(api) = compute_api(osdev) else { continue };
        let rank = GPU_APIS.iter().position(|&a| a == api).unwrap_or(GPU_APIS.len());
        let pci_parent = osdev.parent().and_then(|p| match p.attributes() {
            Some(ObjectAttributes::PCIDevice(pci)) => Some(pci),
            _ => None,
        });
        let key = match pci_parent {
            Some(pci) => (u32::from(pci.domain()), pci.bus_id(), pci.bus_device(), pci.function(), 0),
            None => (u32::MAX, 0, 0, 0, osdev.global_persistent_index()),
        };
        let info = GpuInfo {
            name: c_string(osdev.name()).unwrap_or_else(|| format!("gpu{}", devices.len())),
            model: c_string(osdev.info("GPUModel")),
            pci: pci_parent.map(|pci| {
                format!(
                    "{:04x}:{:02x}:{:02x}.{:x}",
                    pci.domain(),
                    pci.bus_id(),
                    pci.bus_device(),
                    pci.function()
                )
            }),
            numa: gpu_numa(osdev, numa_nodes),
        };
        match devices.get_mut(&key) {
            // Another API's view of a device already seen: keep the preferred name.
            Some((seen, gpu)) => {
                if rank < *seen {
                    *seen = rank;
                    gpu.name = info.name;
                }
                if gpu.model.is_none() {
                    gpu.model = info.model;
                }
            }
            None => {
                devices.insert(key, (rank, info));
            }
        }
    }
    devices.into_values().map(|(_, gpu)| gpu).collect()
}

/// The compute API of an OS device that is a GPU, or `None`.
fn compute_api(osdev: &TopologyObject) -> Option<&'static str> {
    let subtype = osdev.subtype()?.to_str().ok()?;
    let api = GPU_APIS.iter().copied().find(|&a| a == subtype)?;
    // OpenCL also lists CPUs and other accelerators under the same subtype.
    if api == "OpenCL" && osdev.info("OpenCLDeviceType").is_some_and(|t| t.to_bytes() != b"GPU") {
        return None;
    }
    Some(api)
}

/// The NUMA node (OS index) an I/O device is local to: the only NUMA node of
/// its first non-I/O ancestor's nodeset, or the only one of those with PUs
/// (a package's DRAM next to its memory-only MCDRAM). Only reported NUMA
/// nodes count.
fn gpu_numa(osdev: &TopologyObject, numa_nodes: &[NumaNode]) -> Option<u32> {
    let nodeset = osdev.first_non_io_ancestor()?.nodeset()?;
    let local: Vec<&NumaNode> = numa_nodes.iter().filter(|n| nodeset.is_set(n.os_index as usize)).collect();
    match local.as_slice() {
        [only] => Some(only.os_index),
        _ => match local.iter().filter(|n| !n.pus.is_empty()).collect::<Vec<_>>().as_slice() {
            [only] => Some(only.os_index),
            _ => None,
        },
    }
}

/// A C string from hwloc as an owned string, if present and UTF-8.
fn c_string(s: Option<&std::ffi::CStr>) -> Option<String> {
    s.and_then(|s| s.to_str().ok()).map(str::to_string)
}

/// OS indices of the PUs in an object's cpuset (cpusets are indexed by OS index).
fn pus_of(obj: &TopologyObject) -> Vec<u32> {
    obj.cpuset().map_or_else(Vec::new, |set| set.iter_set().map(|i| usize::from(i) as u32).collect())
}

/// An object's OS index, or its logical index when hwloc does not know it.
fn os_index(obj: &TopologyObject) -> u32 {
    obj.os_index().unwrap_or(obj.logical_index()) as u32
}

/// This machine's host name.
pub(crate) fn hostname() -> Result<String, TopologyError> {
    let name = nix::unistd::gethostname().map_err(TopologyError::Hostname)?;
    Ok(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGIES: &str = "/work/shared/topologies";

    fn load(name: &str) -> Option<NodeInfo> {
        let path = Path::new(TOPOLOGIES).join(name);
        if !path.exists() {
            eprintln!("skipping: {} is not present", path.display());
            return None;
        }
        Some(from_xml_file(&path).unwrap())
    }

    /// Checks the invariants every NodeInfo must hold.
    fn check_consistent(info: &NodeInfo) {
        let mut pus: Vec<u32> = info.pus().collect();
        let n = pus.len();
        pus.sort_unstable();
        pus.dedup();
        assert_eq!(pus.len(), n, "a PU belongs to two cores");
        // A PU may lack an allowed NUMA node (its memory is outside our
        // cpuset), but a NUMA node never names a PU that is not a core's.
        for node in &info.numa_nodes {
            assert!(node.pus.iter().all(|p| pus.contains(p)), "{node:?} names an unknown PU");
        }
        assert!(info.cores.iter().all(|c| !c.is_empty()));
        assert!(!info.hostname.is_empty());
        assert_eq!(info.limits, LIMITS);
        // Packages and L3 caches partition (part of) the PUs.
        for sets in [&info.package_pus, &info.l3] {
            let mut seen: Vec<u32> = sets.iter().flatten().copied().collect();
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), n, "a PU is in two packages or L3 caches: {sets:?}");
            assert!(seen.iter().all(|p| pus.contains(p)), "unknown PU in {sets:?}");
        }
        assert_eq!(info.package_pus.len(), info.packages as usize);
        for gpu in &info.gpus {
            if let Some(numa) = gpu.numa {
                assert!(info.numa_nodes.iter().any(|n| n.os_index == numa), "{gpu:?}");
            }
        }
    }

    #[test]
    fn two_socket_xeon() {
        let Some(info) = load("32em64t-2n8c2t-pci-normalio.xml") else { return };
        check_consistent(&info);
        assert_eq!(info.numa_nodes.len(), 2);
        assert_eq!(info.cores.len(), 16);
        assert_eq!(info.pus().count(), 32);
        assert_eq!(info.packages, 2);
        assert!(info.cores.iter().all(|c| c.len() == 2));
        let mut numa_pus: Vec<u32> = info.numa_nodes.iter().flat_map(|n| n.pus.clone()).collect();
        numa_pus.sort_unstable();
        assert_eq!(numa_pus, (0..32).collect::<Vec<_>>());
        assert!(info.numa_nodes.iter().all(|n| n.memory > 0));
        assert_eq!(info.memory, info.numa_nodes.iter().map(|n| n.memory).sum::<u64>());
    }

    #[test]
    fn large_smp() {
        let Some(info) = load("192em64t-24n8c2t.xml") else { return };
        check_consistent(&info);
        assert_eq!(info.numa_nodes.len(), 24);
        assert_eq!(info.cores.len(), 192);
        assert_eq!(info.pus().count(), 384);
        assert_eq!(info.packages, 24);
        let os: Vec<u32> = info.numa_nodes.iter().map(|n| n.os_index).collect();
        assert_eq!(os, (0..24).collect::<Vec<_>>());
        assert!(info.numa_nodes.iter().all(|n| n.pus.len() == 16));
    }

    #[test]
    fn disallowed_pus_and_cpuless_numa_nodes() {
        let Some(info) = load("16amd64-8n2c-cpusets.xml") else { return };
        check_consistent(&info);
        // allowed_cpuset 0xf06f: PUs 0-3, 5, 6, 12-15; allowed_nodeset 0x3e: nodes 1-5.
        let mut pus: Vec<u32> = info.pus().collect();
        pus.sort_unstable();
        assert_eq!(pus, vec![0, 1, 2, 3, 5, 6, 12, 13, 14, 15]);
        assert_eq!(info.cores.len(), 10);
        let os: Vec<u32> = info.numa_nodes.iter().map(|n| n.os_index).collect();
        assert_eq!(os, vec![1, 2, 3, 4, 5]);
        // PUs 0-1 and 12-15 are allowed but their NUMA nodes (0, 6, 7) are not.
        let numa_pus: Vec<u32> = info.numa_nodes.iter().flat_map(|n| n.pus.clone()).collect();
        assert_eq!(numa_pus, vec![2, 3, 5, 6]);
        for cpuless in [4, 5] {
            let node = info.numa_nodes.iter().find(|n| n.os_index == cpuless).unwrap();
            assert!(node.pus.is_empty(), "node {cpuless} has no PU");
        }
    }

    #[test]
    fn memory_only_numa_nodes() {
        let Some(info) = load("64intel64-fakeKNL-SNC4-hybrid.xml") else { return };
        check_consistent(&info);
        assert_eq!(info.numa_nodes.len(), 8);
        assert_eq!(info.cores.len(), 16);
        assert_eq!(info.pus().count(), 64);
    }

    #[test]
    fn gpus_are_counted_once_per_device_with_their_numa_node() {
        let Some(info) = load("power8gpudistances.xml") else { return };
        check_consistent(&info);
        // Each P100 appears as cudaN, nvmlN and opencl0dN under one PCI device.
        let names: Vec<&str> = info.gpus.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["cuda0", "cuda1", "cuda2", "cuda3"]);
        let pci: Vec<&str> = info.gpus.iter().map(|g| g.pci.as_deref().unwrap()).collect();
        assert_eq!(pci, ["0002:01:00.0", "0003:01:00.0", "000a:01:00.0", "000b:01:00.0"]);
        let numa: Vec<Option<u32>> = info.gpus.iter().map(|g| g.numa).collect();
        assert_eq!(numa, [Some(0), Some(0), Some(1), Some(1)]);
        assert!(info.gpus.iter().all(|g| g.model.as_deref() == Some("Tesla P100-SXM2-16GB")));
        assert_eq!(info.packages, 2);
        assert_eq!(info.l3.len(), 8, "POWER8 has an L3 region per core");
        assert!(info.l3.iter().all(|c| c.len() == 2));
    }

    #[test]
    fn display_devices_are_not_gpus() {
        // An NVIDIA Tesla (cuda0 beside a DRM card0) and an AMD Radeon seen
        // through OpenCL, both behind the second socket's PCI bridge.
        let Some(info) = load("32em64t-2n8c2t-pci-normalio.xml") else { return };
        check_consistent(&info);
        let names: Vec<&str> = info.gpus.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["cuda0", "opencl0d1"]);
        assert!(info.gpus.iter().all(|g| g.numa == Some(1)), "{:?}", info.gpus);
        // Only a DRM card0 on a server VGA chip: no GPU.
        let Some(info) = load("96em64t-4n4d3ca2co-pci.xml") else { return };
        check_consistent(&info);
        assert!(info.gpus.is_empty(), "{:?}", info.gpus);
    }

    #[test]
    fn packages_and_l3_caches_as_pu_sets() {
        let Some(info) = load("16em64t-4s2c2t.xml") else { return };
        check_consistent(&info);
        assert_eq!(info.package_pus.len(), 4);
        assert_eq!(info.l3.len(), 4, "one L3 per socket");
        assert!(info.l3.iter().all(|c| c.len() == 4));
        assert!(info.gpus.is_empty());
        let Some(info) = load("192em64t-24n8c2t.xml") else { return };
        assert_eq!(info.package_pus.len(), 24);
        assert_eq!(info.l3.len(), 24);
        assert!(info.l3.iter().all(|c| c.len() == 16));
    }

    #[test]
    fn every_shipped_topology_loads() {
        let Ok(dir) = std::fs::read_dir(TOPOLOGIES) else { return };
        for entry in dir {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "xml") {
                let info = from_xml_file(&path).unwrap_or_else(|e| panic!("{e}"));
                check_consistent(&info);
            }
        }
    }

    #[test]
    fn live_machine() {
        let info = discover().unwrap();
        check_consistent(&info);
        assert!(info.memory > 0);
        assert!(info.packages >= 1);
        // Every CPU this process may run on is a PU hwloc reports.
        let affinity = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        let pus: Vec<u32> = info.pus().collect();
        for cpu in 0..nix::sched::CpuSet::count() {
            if affinity.is_set(cpu).unwrap() {
                assert!(pus.contains(&(cpu as u32)), "CPU {cpu} is missing from {pus:?}");
            }
        }
    }

    #[test]
    fn malformed_xml_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.xml");
        std::fs::write(&path, "<?xml version=\"1.0\"?>\n<topology version=\"2.0\"><object type=").unwrap();
        let err = from_xml_file(&path).unwrap_err();
        assert!(matches!(err, TopologyError::XmlFile { .. }));
        assert!(err.to_string().contains("broken.xml"), "{err}");

        let path = dir.path().join("not-xml.xml");
        std::fs::write(&path, "this is not xml at all").unwrap();
        let err = from_xml_file(&path).unwrap_err();
        assert!(err.to_string().contains("not-xml.xml"), "{err}");

        let missing = dir.path().join("missing.xml");
        let err = from_xml_file(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.xml"), "{err}");
        assert!(err.to_string().contains("No such file"), "{err}");
    }
}
