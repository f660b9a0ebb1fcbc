//! [`Core::sanity_check`]: walks every invariant of the core's state and
//! panics with a description of the first one broken. Tests call it after
//! every event (the approach of tako's `sanity_check` in HyperQueue).

use std::collections::{BTreeMap, BTreeSet};

use super::{Core, NodeId, Policy};

impl Core {
    /// Checks every invariant; panics with a description when one is broken.
    ///
    /// Costs O(jobs + running tasks + nodes): for tests and debugging.
    pub fn sanity_check(&self) {
        self.nodes.sanity_check();
        self.table.check(&self.nodes, &self.draining);
        self.fair_share.sanity_check(self.now);
        self.check_running();
        self.check_jobs();
        self.check_queue();
        for node in &self.draining {
            assert!(self.nodes.shape(*node).is_some(), "draining node {node:?} is not known");
        }
        let cores: u64 =
            self.nodes.node_ids().filter_map(|n| self.nodes.shape(n)).map(|s| u64::from(s.cores())).sum();
        assert_eq!(cores, self.cluster_cores, "cluster core count");
    }

    /// Every running task's allocation is held in the resources, and nothing
    /// else is.
    fn check_running(&self) {
        let mut held: BTreeMap<NodeId, (BTreeSet<u32>, u64)> = BTreeMap::new();
        let mut by_user: BTreeMap<u32, u64> = BTreeMap::new();
        for (task, r) in &self.running.tasks {
            let job = self.jobs.get(&task.seq);
            assert!(job.is_some(), "{task:?} runs but its job is not known");
            assert_eq!(r.user, job.expect("checked").request.user, "{task:?}: user");
            let mut cores = 0;
            for a in &r.allocation.nodes {
                let shape = self.nodes.shape(a.node);
                assert!(shape.is_some(), "{task:?} runs on unknown node {:?}", a.node);
                let n = shape.expect("checked").cores();
                let (set, mem) = held.entry(a.node).or_default();
                for &c in &a.cores {
                    assert!(c < n, "{task:?}: core {c} beyond node {:?}", a.node);
                    assert!(set.insert(c), "core {c} of node {:?} double-booked ({task:?})", a.node);
                }
                *mem += a.mem.iter().map(|&(_, m)| m).sum::<u64>();
                cores += a.cores.len() as u64;
            }
            assert_eq!(cores, r.cores, "{task:?}: core count");
            *by_user.entry(r.user).or_default() += cores;
        }
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for r in self.running.tasks.values() {
            for a in &r.allocation.nodes {
                *per_node.entry(a.node).or_default() += 1;
            }
        }
        for node in self.nodes.node_ids() {
            let n = per_node.get(&node).copied().unwrap_or(0);
            assert_eq!(self.table.tasks_on(node), n, "node {node:?}: tasks in the end profile");
        }
        for node in self.nodes.node_ids() {
            let shape = self.nodes.shape(node).expect("listed");
            let (free_cores, free_mem, _) = self.nodes.node_free(node).expect("listed");
            let (cores, mem) = held.get(&node).map_or((0, 0), |(s, m)| (s.len() as u32, *m));
            assert_eq!(
                shape.cores() - free_cores,
                cores,
                "node {node:?}: used cores differ from running tasks"
            );
            assert_eq!(
                shape.memory() - free_mem,
                mem,
                "node {node:?}: used memory differs from running tasks"
            );
        }
        for (&user, &cores) in &by_user {
            assert_eq!(
                self.fair_share.running_cores(user),
                cores,
                "user {user}: running cores in fair share"
            );
        }
    }

    /// Task counts of every job add up; no job is both live and finished.
    fn check_jobs(&self) {
        for (&seq, job) in &self.jobs {
            assert!(!self.finished.contains_key(&seq), "job {seq} is both live and finished");
            assert!(job.cursor <= job.total, "job {seq}: cursor beyond the end");
            assert!(!job.is_done(), "job {seq} is done but still live");
            let running = self.running.of_job(seq).count() as u64;
            assert_eq!(running, job.running, "job {seq}: running count");
            // Cancelled array tasks count as ended already, adopted ones
            // passed over by the cursor as running.
            let unstarted = job.total - job.cursor - job.skipped.len() as u64 + job.requeued.len() as u64;
            let first = super::TaskId { seq, index: None };
            let last = super::TaskId { seq, index: Some(u32::MAX) };
            let unconfirmed = self.unconfirmed.range(first..=last).count() as u64;
            assert_eq!(unconfirmed, job.unconfirmed, "job {seq}: unconfirmed count");
            assert_eq!(
                job.ended + job.running + job.unconfirmed + unstarted,
                job.total + job.extra,
                "job {seq}: ended {} + running {} + unconfirmed {} + unstarted {unstarted} != total {} + {}",
                job.ended,
                job.running,
                job.unconfirmed,
                job.total,
                job.extra
            );
            for t in &job.requeued {
                assert!(
                    !self.running.tasks.contains_key(&super::TaskId { seq, index: *t }),
                    "job {seq}: requeued {t:?} runs"
                );
            }
            if let Some(Some(i)) = job.next_task() {
                assert!(!job.skipped.contains(&i), "job {seq}: a cancelled index at the cursor");
            }
            if let Some(array) = &job.request.array {
                for &i in &job.skipped {
                    assert!(
                        super::position_of(array, i) > job.cursor,
                        "job {seq}: cancelled index {i} behind the cursor"
                    );
                }
            }
            for (_, on) in &job.waiting_on {
                assert!(
                    self.dependents.get(&on.seq()).is_some_and(|d| d.contains(&seq)),
                    "job {seq} waits on {on} but is not among its dependents"
                );
            }
        }
        for task in self.running.tasks.keys() {
            assert!(self.jobs.contains_key(&task.seq), "{task:?} runs for a finished job");
        }
    }

    /// The queue holds exactly the eligible jobs, each under the key its
    /// state gives.
    fn check_queue(&self) {
        let eligible = self.jobs.values().filter(|j| j.is_eligible()).count();
        assert_eq!(eligible, self.queue.len(), "queue length differs from the number of eligible jobs");
        let mut last = None;
        for (key, entry) in self.queue.iter() {
            let job = self.jobs.get(&key.seq);
            assert!(job.is_some(), "queued job {} is not known", key.seq);
            let job = job.expect("checked");
            assert!(job.is_eligible(), "queued job {} is not eligible", key.seq);
            assert_eq!(job.queued, Some(*key), "job {}: stored queue key", key.seq);
            assert_eq!(entry.cores, job.task_cores(), "job {}: queued size", key.seq);
            assert_eq!(entry.walltime, job.walltime(&self.config), "job {}: queued walltime", key.seq);
            assert_eq!(
                key.rank,
                job.rank(&self.config),
                "job {}: queue rank inconsistent with its priority",
                key.seq
            );
            if self.config.policy != Policy::Multifactor {
                assert_eq!(job.priority, 0, "job {}: a priority outside multifactor", key.seq);
            }
            assert!(last < Some(*key), "queue out of order at job {}", key.seq);
            last = Some(*key);
        }
        for (&seq, job) in &self.jobs {
            if !job.is_eligible() {
                assert!(job.queued.is_none(), "job {seq} is not eligible but has a queue key");
            }
        }
    }
}
