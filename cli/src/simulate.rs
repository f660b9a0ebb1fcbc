//! `picloud simulate`: replays a Standard Workload Format trace through the
//! scheduling core in virtual time and reports waits, slowdown, utilization
//! and the simulator's own speed.
//!
//! The cluster is `--nodes N --cores C` identical simple nodes, or
//! `--topology FILE.xml --nodes N` nodes of the hwloc topology in the file.
//! The replay itself is `picloud_scheduler::sim`; this command reads the
//! files, times the replay on the wall clock, and prints.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use picloud_scheduler::core::{CoreConfig, NodeShape, Policy};
use picloud_scheduler::sim::{self, Cluster, Metrics, Workload};

/// Memory given to each core of a `--cores` node (jobs of a trace ask for none).
const MEMORY_PER_CORE: u64 = 4 << 30;

/// Arguments of `picloud simulate`.
#[derive(Debug, clap::Args)]
pub(crate) struct SimulateArgs {
    /// The trace, in Standard Workload Format.
    trace: PathBuf,
    /// Number of nodes.
    #[arg(long)]
    nodes: u32,
    /// Cores per node (simple nodes: one PU per core, one NUMA node).
    #[arg(long, conflicts_with = "topology", required_unless_present = "topology")]
    cores: Option<u32>,
    /// An hwloc XML topology that every node has (e.g. from `lstopo --of xml`).
    #[arg(long, value_name = "FILE.xml")]
    topology: Option<PathBuf>,
    /// Scheduling policy: fcfs, easy, sjf-easy or multifactor.
    #[arg(long, default_value = "multifactor")]
    policy: Policy,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `picloud simulate`.
pub(crate) fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let shape = match (&args.topology, args.cores) {
        (Some(xml), _) => {
            let info = picloud_nodeagent::topology::from_xml_file(xml)
                .with_context(|| format!("cannot read the topology {}", xml.display()))?;
            NodeShape::from_info(&info)
        }
        (None, Some(0)) => bail!("--cores must be at least 1"),
        (None, Some(c)) => NodeShape::simple(c, u64::from(c) * MEMORY_PER_CORE),
        (None, None) => bail!("give --cores C or --topology FILE.xml"),
    };
    if shape.cores() == 0 {
        bail!("the topology has no cores");
    }
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("cannot read the trace {}", args.trace.display()))?;
    let trace = sim::parse_swf(&text)
        .with_context(|| format!("{} is not a valid SWF trace", args.trace.display()))?;
    let cluster = Cluster { nodes: args.nodes, shape };
    let workload = Workload::from_swf(&trace, &cluster);

    let started = Instant::now();
    let result = sim::simulate(&workload, &cluster, CoreConfig::with_policy(args.policy));
    let wall = started.elapsed().as_secs_f64();
    let m = &result.metrics;
    let speed = if wall > 0.0 { m.events as f64 / wall } else { f64::INFINITY };

    if args.json {
        let mut value = serde_json::to_value(m)?;
        let obj = value.as_object_mut().expect("metrics serialize to an object");
        obj.insert("trace".into(), args.trace.display().to_string().into());
        obj.insert("nodes".into(), args.nodes.into());
        obj.insert("cores_per_node".into(), cluster.shape.cores().into());
        obj.insert("wall_seconds".into(), wall.into());
        obj.insert("events_per_second".into(), speed.into());
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_table(&args, &cluster, m, wall, speed);
    }
    Ok(())
}

fn print_table(args: &SimulateArgs, cluster: &Cluster, m: &Metrics, wall: f64, speed: f64) {
    let c = cluster.shape.cores();
    println!(
        "{}: {} node(s) x {} core(s) = {} cores, policy {}",
        args.trace.display(),
        cluster.nodes,
        c,
        m.cores,
        m.policy
    );
    let rows: Vec<(&str, String)> = vec![
        ("jobs", m.jobs.to_string()),
        (
            "skipped",
            format!(
                "{} (no run time {}, no processors {}, larger than the cluster {})",
                m.skipped.total(),
                m.skipped.no_run_time,
                m.skipped.no_processors,
                m.skipped.too_large
            ),
        ),
        ("utilization", format!("{:.1} %", 100.0 * m.utilization)),
        ("mean wait", format!("{:.0} s", m.mean_wait)),
        ("max wait", format!("{:.0} s", m.max_wait)),
        ("mean bounded slowdown", format!("{:.2}", m.mean_bounded_slowdown)),
        ("makespan", format!("{:.0} s", m.makespan)),
        ("events", m.events.to_string()),
        ("speed", format!("{:.0} events/s ({:.3} s wall)", speed, wall)),
    ];
    for (name, value) in rows {
        println!("  {name:<24}{value}");
    }
    if m.estimated_from_run > 0 {
        println!(
            "note: {} job(s) have no requested time; their run times serve as the estimates (exact walltimes)",
            m.estimated_from_run
        );
    }
    if m.capped_at_walltime > 0 {
        println!(
            "note: {} job(s) ran longer than requested and were cut at their walltime",
            m.capped_at_walltime
        );
    }
    if m.never_started > 0 {
        println!("note: {} job(s) never started", m.never_started);
    }
}
