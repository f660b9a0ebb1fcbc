//! Agents joining, leaving and coming back, and what becomes of the tasks
//! of a node that is lost.
//!
//! 1. An agent's `Hello` gives its node: a host name seen before gets its
//!    node number back (`names`), a new one the next number (recorded, so
//!    that `exec_host` survives a restart). A connection of a host that is
//!    still connected replaces the old one, whose node counts as lost first.
//! 2. The node is up for queries at once, but the scheduling core learns of
//!    it only when the agent's `Running` report arrives (its first message
//!    after the ends it kept while it had no server): then the tasks the
//!    table expects there and the agent confirms keep running, tasks the
//!    agent runs that are still waiting to start (queued again, or started
//!    by a server that died before its start was on disk) are adopted and
//!    recorded as started, the expected tasks it does not report are lost
//!    (step 4), and every other task it runs is killed (`ToAgent::Kill`:
//!    it was moved elsewhere or has ended). Nothing starts on the node
//!    before, so no task can be sent to an agent that already runs it.
//! 3. Any message of an agent counts as a heartbeat. An agent silent for
//!    `node_timeout` is lost: its connection is closed and its tasks meet
//!    step 4; an agent that was only slow reconnects and goes through step
//!    2. An agent whose connection closes (a network failure, or the agent
//!    died) is away: its node takes no new task, and its tasks are kept for
//!    `node_timeout` after it was last heard from. If it connects again by
//!    then, step 2 keeps the tasks it still runs and loses the others (an
//!    agent that died and was started again runs none of them); if not,
//!    the node is lost as a silent one is. A connection that replaces one
//!    still open (the old one was cut without the server seeing it) makes
//!    the node away the same way.
//! 4. A lost task's fate comes from [`restore::fate_of_running`]: a task
//!    being killed ends as deleted; a rerunnable one is queued again (its
//!    rerun counted and recorded) while it has been queued again fewer than
//!    `node_loss_retries` times; any other fails as `node lost`, with a
//!    comment that says when the retries are used up.
//! 5. After a restart, the tasks the journal shows running wait, as
//!    unconfirmed, for their agents to report them; those no agent has
//!    reported `node_timeout` after the start are lost (step 4).

use std::time::{Duration, Instant};

use picloud_proto::{EXIT_CANCELLED, NodeInfo, TaskEnd, TaskId, TaskRunning, ToAgent};
use tracing::{info, warn};

use super::restore::{RunningFate, fate_of_running};
use super::{AgentLink, ConnId, CoreLoop, LiveChange, unix_now};
use crate::core::{Adopted, Event, NodeId, NodeShape};
use crate::server::snapshot::NodeView;

impl CoreLoop {
    pub(super) fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.core.config().node_timeout)
    }

    /// Step 1.
    pub(super) fn agent_joined(&mut self, conn: ConnId, info: NodeInfo) {
        let node = match self.names.get(&info.hostname) {
            Some(&node) => node,
            None => {
                let node = NodeId(self.next_node);
                self.next_node += 1;
                self.names.insert(info.hostname.clone(), node);
                self.journal_only(&LiveChange::NodeJoined { node, name: info.hostname.clone() });
                node
            }
        };
        if let Some(old) = self.links.get(&node).and_then(|l| l.conn) {
            warn!(node = %info.hostname, "the agent connected again: its old connection is closed");
            self.agent_conns.remove(&old);
            self.close(old);
            self.node_away(node);
        }
        info!(node = %info.hostname, cores = info.cores.len(), "agent joined");
        let shape = NodeShape::from_info(&info);
        let running = self.nodes.get(&node).map(|n| n.running.clone()).unwrap_or_default();
        let view =
            NodeView { name: info.hostname.clone(), info: std::sync::Arc::new(info), up: true, running };
        self.nodes.insert(node, std::sync::Arc::new(view));
        self.nodes_changed = true;
        let link = AgentLink {
            conn: Some(conn),
            pending_starts: Vec::new(),
            last_heard: Instant::now(),
            joining: Some(shape),
            away: false,
        };
        self.links.insert(node, link);
        self.agent_conns.insert(conn, node);
    }

    /// Step 2: the agent's report of every task it runs.
    pub(super) fn reconcile(&mut self, node: NodeId, tasks: Vec<TaskRunning>) {
        let Some(shape) = self.links.get_mut(&node).and_then(|l| l.joining.take()) else {
            warn!(node = node.0, "ignoring a second report of running tasks");
            return;
        };
        let reported: std::collections::BTreeSet<TaskId> = tasks.iter().map(|t| t.task).collect();
        // Expected here and not reported: lost with the agent's old life.
        // All of them, if the core knows the node with another shape: the
        // core loses them with the node it replaces.
        let reshaped = self.core.resources().shape(node).is_some_and(|s| *s != shape);
        let expected: Vec<TaskId> =
            self.nodes.get(&node).map(|n| n.running.iter().copied().collect()).unwrap_or_default();
        for task in expected.into_iter().filter(|t| reshaped || !reported.contains(t)) {
            self.lose_task(task);
        }
        let mut adopt = Vec::new();
        let mut kill = Vec::new();
        let mut kill_again = Vec::new();
        for t in tasks {
            let task = t.task;
            let rec = self.jobs.get(task.seq).and_then(|j| j.tasks.get(&task.index).cloned());
            let here = rec.as_ref().is_some_and(|r| !r.is_finished() && r.node == Some(node));
            if here && self.core.is_running(task) {
                // Started here by this server: kept as it is, and killed
                // again if a kill was sent while the agent was away. The
                // agent holds its job's definition (it is told to forget it).
                self.holds_definition(task.seq, node);
                if let Some(by) = rec.and_then(|r| r.cancelled_by.clone()) {
                    kill_again.push((task, by));
                }
                continue;
            }
            // Adopted: expected here but not known to run (after a restart),
            // or without a record and waiting to start.
            if (here || rec.is_none()) && self.core.adoptable(task) {
                adopt.push(t);
            } else {
                kill.push(task);
            }
        }
        let running: Vec<Adopted> = adopt
            .iter()
            .map(|t| Adopted { task: t.task, pus: t.cpus.clone(), gpus: t.gpus.clone() })
            .collect();
        self.apply(Event::Rejoined { node, shape, running });
        for t in adopt {
            self.adopted(node, &t);
        }
        for (task, by) in kill_again {
            self.send_to_node(node, &ToAgent::Kill { task, reason: format!("Job deleted by {by}") });
        }
        for task in kill {
            info!(?task, node = node.0, "killing a task that no longer runs there");
            let reason = "the task was moved to another node or ended while its node was lost".to_string();
            self.send_to_node(node, &ToAgent::Kill { task, reason });
        }
    }

    /// Adopts one task an agent runs (or ran: its end came after the agent
    /// was away), outside a `Running` report.
    pub(super) fn adopt(&mut self, node: NodeId, t: &TaskRunning) {
        let task = Adopted { task: t.task, pus: t.cpus.clone(), gpus: t.gpus.clone() };
        self.apply(Event::Adopt { node, task });
        self.adopted(node, t);
    }

    /// After the core was asked to adopt `t`: records it as started there
    /// if the core took it, resends a kill that was pending, and kills it
    /// if the core refused it.
    fn adopted(&mut self, node: NodeId, t: &TaskRunning) {
        let task = t.task;
        if !self.core.is_running(task) {
            warn!(?task, node = node.0, "cannot adopt a task its agent runs: killing it");
            let reason = "the server could not take this task back after it lost track of it".to_string();
            self.send_to_node(node, &ToAgent::Kill { task, reason });
            return;
        }
        self.holds_definition(task.seq, node);
        let recorded = self.jobs.get(task.seq).is_some_and(|j| j.is_running(task.index));
        if !recorded {
            self.record(LiveChange::Started { task, node, cpus: t.cpus.clone(), time: unix_now() });
            self.touched.push(task.seq);
        }
        if let Some(n) = self.node_mut(node) {
            n.running.insert(task);
        }
        let by = self
            .jobs
            .get(task.seq)
            .and_then(|j| j.tasks.get(&task.index))
            .and_then(|r| r.cancelled_by.clone());
        if let Some(by) = by {
            self.send_to_node(node, &ToAgent::Kill { task, reason: format!("Job deleted by {by}") });
        }
    }

    /// Notes that the agent of `node` holds job `seq`'s definition (it runs
    /// a task of it), so that it is told to forget it when the job is done.
    fn holds_definition(&mut self, seq: u64, node: NodeId) {
        let nodes = self.defined_on.entry(seq).or_default();
        if !nodes.contains(&node) {
            nodes.push(node);
        }
    }

    /// Step 3: the connection of the node's agent closed. A joined node is
    /// away: it takes no new task, and its tasks wait for the agent to come
    /// back until `node_timeout` after it was last heard from. A node the
    /// core does not know yet (its agent had not reported what it runs) is
    /// down at once.
    pub(super) fn node_away(&mut self, node: NodeId) {
        if self.core.resources().shape(node).is_none() {
            if self.grace_until.is_none() {
                return self.node_down(node);
            }
            // After a restart, before its agent reported: the tasks the
            // journal shows there wait for the grace period (step 5), not
            // for this connection.
            return self.detach(node, false);
        }
        // Starts it may not have read are lost with its old life when it
        // reports what it runs (step 2), or when it does not come back.
        self.detach(node, true);
        self.apply(Event::NodeLeft(node));
    }

    /// Forgets the node's connection (`away`: its tasks wait for it to
    /// come back) and the starts not sent on it; the node shows as down.
    /// The next agent there may be a new process: it gets every definition
    /// again.
    fn detach(&mut self, node: NodeId, away: bool) {
        if let Some(link) = self.links.get_mut(&node) {
            link.conn = None;
            link.away = away;
            link.joining = None;
            link.pending_starts.clear();
        }
        for nodes in self.defined_on.values_mut() {
            nodes.retain(|&n| n != node);
        }
        if let Some(n) = self.node_mut(node) {
            n.up = false;
        }
        self.nodes_changed = true;
    }

    /// The node's agent is gone (it fell silent, stayed away, or its
    /// connection closed before it reported what it runs): every task
    /// there is lost (step 4) and the core forgets the node.
    pub(super) fn node_down(&mut self, node: NodeId) {
        self.detach(node, false);
        // The core knows the node once its agent reported what it runs
        // (also from an earlier connection, when it was away).
        let joined = self.core.resources().shape(node).is_some();
        if joined {
            // No task of it may start there again while its tasks are lost.
            self.apply(Event::NodeLeft(node));
        }
        let running: Vec<TaskId> = match self.node_mut(node) {
            Some(n) => std::mem::take(&mut n.running).into_iter().collect(),
            None => Vec::new(),
        };
        for task in running {
            self.lose_task(task);
        }
        if joined {
            self.apply(Event::NodeLost(node));
        }
    }

    /// Step 4: a task whose node was lost (or that no agent confirmed).
    pub(super) fn lose_task(&mut self, task: TaskId) {
        let limit = self.core.config().node_loss_retries;
        let Some(job) = self.jobs.get(task.seq) else { return };
        let Some(rec) = job.tasks.get(&task.index).filter(|r| !r.is_finished()) else { return };
        let fate = fate_of_running(job, task.index, rec, limit);
        if let Some(n) = rec.node {
            if let Some(v) = self.node_mut(n) {
                v.running.remove(&task);
            }
        }
        self.touched.push(task.seq);
        self.ended_since_check = true;
        match fate {
            RunningFate::Requeue => {
                self.record(LiveChange::Requeued { task });
                self.apply(Event::Requeue(task));
            }
            RunningFate::Lost => {
                self.acting_user = "the server".into();
                // The core ends it (`Decision::End`), recorded with the node's name.
                self.apply(Event::Lost(task));
            }
            RunningFate::Cancelled => {
                // `finish` reports a task being killed as deleted.
                let end = TaskEnd {
                    task,
                    exit_status: EXIT_CANCELLED,
                    comment: None,
                    used: Default::default(),
                    outcome: None,
                };
                self.record(LiveChange::Finished { end: &end, time: unix_now() });
                self.forget_if_done(task.seq);
                self.apply(Event::TaskFinished { task, success: false });
            }
        }
    }

    /// Steps 3 and 5, at the start of each batch.
    pub(super) fn check_nodes(&mut self) {
        let now = Instant::now();
        let timeout = self.node_timeout();
        let silent: Vec<(NodeId, ConnId)> = self
            .links
            .iter()
            .filter_map(|(&n, l)| Some((n, l.conn?)).filter(|_| now.duration_since(l.last_heard) >= timeout))
            .collect();
        for (node, conn) in silent {
            if let Some(n) = self.nodes.get(&node) {
                warn!(node = %n.name, timeout_ms = timeout.as_millis() as u64, "agent silent: node lost");
            }
            self.agent_conns.remove(&conn);
            self.close(conn);
            self.node_down(node);
        }
        let gone: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(_, l)| l.away && now.duration_since(l.last_heard) >= timeout)
            .map(|(&n, _)| n)
            .collect();
        for node in gone {
            if let Some(n) = self.nodes.get(&node) {
                warn!(node = %n.name, timeout_ms = timeout.as_millis() as u64, "agent did not come back: node lost");
            }
            self.node_down(node);
        }
        if self.grace_until.is_some_and(|t| now >= t) {
            self.grace_until = None;
            let unconfirmed: Vec<TaskId> = self.core.unconfirmed().collect();
            if !unconfirmed.is_empty() {
                info!(tasks = unconfirmed.len(), "tasks that ran at the restart and no agent reported: lost");
            }
            for task in unconfirmed {
                self.lose_task(task);
            }
        }
    }

    /// When [`CoreLoop::check_nodes`] has something to do next.
    pub(super) fn next_node_deadline(&self) -> Option<Instant> {
        let timeout = self.node_timeout();
        let silent =
            self.links.values().filter(|l| l.conn.is_some() || l.away).map(|l| l.last_heard + timeout).min();
        match (silent, self.grace_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
