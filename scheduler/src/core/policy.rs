//! Scheduling policies, the core's configuration and the multifactor priority.
//!
//! [`Policy`] chooses the order of the queue and whether lower jobs may be
//! backfilled; [`CoreConfig`] holds every tunable with its default;
//! [`PriorityFactors`] is one job's multifactor priority broken down, as
//! Slurm's `sprio` shows it.

use std::fmt;
use std::str::FromStr;

use super::Millis;

/// How the queue is ordered and whether jobs may overtake a blocked one.
///
/// Every policy but [`Policy::Fcfs`] uses EASY backfilling (Lifka, "The ANL/IBM
/// SP scheduling system", JSSPP 1995; Mu'alem and Feitelson, "Utilization,
/// predictability, workloads, and user runtime estimates in scheduling the IBM
/// SP2 with backfilling", IEEE TPDS 2001): the first job that does not fit gets
/// a reservation, and later jobs start only if they do not delay it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Submission order, no backfill: the first eligible job that does not fit
    /// stops the pass (strict first come, first served).
    Fcfs,
    /// Submission order with EASY backfill.
    Easy,
    /// Shortest requested walltime first, with EASY backfill.
    SjfEasy,
    /// Multifactor priority (fair share, age, job size, explicit priority)
    /// with EASY backfill, as Slurm's `priority/multifactor` plugin.
    #[default]
    Multifactor,
}

impl Policy {
    /// Every policy, in the order documentation lists them.
    pub const ALL: [Policy; 4] = [Policy::Fcfs, Policy::Easy, Policy::SjfEasy, Policy::Multifactor];

    /// The name used on the command line and in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fcfs => "fcfs",
            Policy::Easy => "easy",
            Policy::SjfEasy => "sjf-easy",
            Policy::Multifactor => "multifactor",
        }
    }

    /// Whether lower jobs may start around a blocked one.
    pub fn backfills(self) -> bool {
        self != Policy::Fcfs
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is not one of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduling policy '{0}' (expected fcfs, easy, sjf-easy or multifactor)")]
pub struct ParsePolicyError(pub String);

impl FromStr for Policy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| ParsePolicyError(s.to_string()))
    }
}

/// Weights of the multifactor priority, as Slurm's `PriorityWeight*`
/// settings: a job's priority is the sum of each factor (a number in 0..=1)
/// times its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriorityWeights {
    /// Weight of the fair-share factor (Slurm `PriorityWeightFairshare`).
    pub fair_share: u32,
    /// Weight of the age factor (Slurm `PriorityWeightAge`).
    pub age: u32,
    /// Weight of the job-size factor (Slurm `PriorityWeightJobSize` with
    /// `PriorityFavorSmall`), which favours small and short jobs.
    pub job_size: u32,
    /// Weight of the explicit priority the user gave (`qsub -p`).
    pub explicit: u32,
}

impl Default for PriorityWeights {
    /// Fair share dominates; age lets a job that waited long enough overtake
    /// one of a user with a little less usage; size and explicit priority
    /// break near-ties.
    fn default() -> Self {
        Self { fair_share: 10_000, age: 5_000, job_size: 1_000, explicit: 1_000 }
    }
}

/// Everything that can be tuned in the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreConfig {
    /// Queue order and backfill.
    pub policy: Policy,
    /// The walltime assumed for a task that asked for none, when planning
    /// reservations and ordering by walltime.
    pub default_walltime: Millis,
    /// Multifactor weights.
    pub weights: PriorityWeights,
    /// Half-life of recorded usage for fair share (Slurm
    /// `PriorityDecayHalfLife`); 0 means usage never decays.
    pub usage_half_life: Millis,
    /// Age at which the age factor reaches 1 (Slurm `PriorityMaxAge`).
    pub max_age: Millis,
    /// Walltime at which the walltime half of the job-size factor reaches 0.
    pub size_reference_walltime: Millis,
    /// Priorities are recomputed on [`super::Event::Tick`] and on any event
    /// at least this long after the last recomputation (Slurm
    /// `PriorityCalcPeriod`).
    pub recompute_interval: Millis,
    /// Most queued jobs examined for backfill in one pass, after the job that
    /// holds the reservation (Slurm `bf_max_job_test`).
    pub backfill_depth: usize,
    /// How many times a rerunnable task is queued again after the node it
    /// ran on was lost (default 3): the next loss fails it. Read by the
    /// server, which decides each lost task's fate.
    pub node_loss_retries: u32,
    /// How long the server waits for a word from an agent (a report or a
    /// heartbeat) before it counts the node as lost, and how long after a
    /// restart it waits for agents to confirm the tasks the journal shows
    /// running. Read by the server.
    pub node_timeout: Millis,
}

/// One hour in milliseconds.
pub const HOUR: Millis = 3_600_000;
/// One day in milliseconds.
pub const DAY: Millis = 24 * HOUR;

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Multifactor,
            default_walltime: HOUR,
            weights: PriorityWeights::default(),
            usage_half_life: 7 * DAY,
            max_age: 7 * DAY,
            size_reference_walltime: DAY,
            recompute_interval: 60_000,
            backfill_depth: 10_000,
            node_loss_retries: 3,
            node_timeout: 10_000,
        }
    }
}

impl CoreConfig {
    /// The default configuration with another policy.
    pub fn with_policy(policy: Policy) -> Self {
        Self { policy, ..Self::default() }
    }
}

/// One job's multifactor priority, factor by factor. Each factor is in 0..=1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriorityFactors {
    /// Time eligible over [`CoreConfig::max_age`], capped at 1.
    pub age: f64,
    /// `2^(-usage/share)`: 1 for a user with no recent usage, 0.5 for one
    /// that used exactly its share, towards 0 above it.
    pub fair_share: f64,
    /// Half from cores (1 for one core, 0 for the whole cluster), half from
    /// walltime (1 for none, 0 at [`CoreConfig::size_reference_walltime`]).
    pub job_size: f64,
    /// The explicit priority -1024..=1023 mapped onto 0..=1.
    pub explicit: f64,
}

impl PriorityFactors {
    /// Computes the factors of a job.
    ///
    /// `eligible_for`: how long it has been eligible; `fair_share`: its user's
    /// fair-share factor; `cores`: cores of one task over all its chunks;
    /// `cluster_cores`: cores of the whole cluster; `walltime`: its requested
    /// (or default) walltime; `explicit`: its explicit priority.
    pub fn compute(
        config: &CoreConfig,
        eligible_for: Millis,
        fair_share: f64,
        cores: u64,
        cluster_cores: u64,
        walltime: Millis,
        explicit: i32,
    ) -> Self {
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { (a as f64 / b as f64).min(1.0) };
        let age = ratio(eligible_for, config.max_age);
        // One core counts as no size at all, the whole cluster as the largest.
        let core_part = 1.0 - ratio(cores.saturating_sub(1), cluster_cores.saturating_sub(1).max(1));
        let time_part = 1.0 - ratio(walltime, config.size_reference_walltime);
        let explicit = f64::from(explicit.clamp(-1024, 1023) + 1024) / 2047.0;
        Self {
            age,
            fair_share: fair_share.clamp(0.0, 1.0),
            job_size: 0.5 * (core_part + time_part),
            explicit,
        }
    }

    /// The priority: each factor times its weight, summed and rounded.
    pub fn priority(&self, weights: &PriorityWeights) -> u64 {
        let sum = self.age * f64::from(weights.age)
            + self.fair_share * f64::from(weights.fair_share)
            + self.job_size * f64::from(weights.job_size)
            + self.explicit * f64::from(weights.explicit);
        sum.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert!("lifo".parse::<Policy>().unwrap_err().to_string().contains("sjf-easy"));
        assert_eq!(Policy::default(), Policy::Multifactor);
        assert!(!Policy::Fcfs.backfills() && Policy::Easy.backfills());
    }

    #[test]
    fn factors_stay_in_range_and_favour_small_short_old_jobs() {
        let c = CoreConfig::default();
        let f = |age, cores, wall, prio| PriorityFactors::compute(&c, age, 1.0, cores, 256, wall, prio);
        let small = f(0, 1, 60_000, 0);
        let wide = f(0, 256, 60_000, 0);
        let long = f(0, 1, 2 * DAY, 0);
        assert!(small.job_size > wide.job_size && small.job_size > long.job_size);
        assert_eq!(wide.job_size, 0.5 * (1.0 - 60_000.0 / DAY as f64));
        assert_eq!(long.job_size, 0.5);
        assert_eq!(f(c.max_age * 2, 1, 0, 0).age, 1.0);
        assert_eq!(f(c.max_age / 2, 1, 0, 0).age, 0.5);
        assert_eq!(f(0, 1, 0, -1024).explicit, 0.0);
        assert_eq!(f(0, 1, 0, 1023).explicit, 1.0);
        assert_eq!(f(0, 1, 0, 5000).explicit, 1.0, "clamped");
        let w = PriorityWeights { fair_share: 100, age: 10, job_size: 1, explicit: 1000 };
        let p = PriorityFactors { age: 0.5, fair_share: 0.25, job_size: 1.0, explicit: 0.0 }.priority(&w);
        assert_eq!(p, 5 + 25 + 1);
    }
}
