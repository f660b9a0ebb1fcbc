//! Fair share: every user's recent usage of the cluster, decaying with a
//! half-life, and the fair-share factor computed from it.
//!
//! Usage is cores × time (core-seconds), accrued continuously while a user's
//! tasks run. Decay is exponential with half-life `h`: usage recorded at time
//! `s` weighs `2^-((t - s)/h)` at time `t`. Decaying every user's usage on
//! every step would cost O(users); instead each value is stored in *inflated
//! units*, multiplied by `2^((s - base)/h)` when it is recorded, which never
//! changes afterwards. The true usage at `t` is the stored value times
//! `2^-((t - base)/h)`, the same factor for every user, so ratios between
//! users need no decay at all. When the inflation grows past
//! [`RENORMALIZE_DOUBLINGS`] doublings, every stored value is divided by it and
//! `base` moves to the present (O(users), once every few dozen half-lives).
//!
//! The factor is Slurm's classic fair-share formula (`priority/multifactor`,
//! "Fairshare Factor"): `F = 2^(-U/S)` with `U` the user's share of the
//! cluster's decayed usage and `S` its share of the cluster, here equal for
//! every user who has submitted (`1/users`).

use std::collections::BTreeMap;

use super::Millis;

/// Doublings of the inflation factor after which stored usage is
/// renormalized. 2^40 keeps stored values far from f64 overflow for any
/// realistic usage (10^9 core-hours is about 2^42 core-seconds).
pub const RENORMALIZE_DOUBLINGS: f64 = 40.0;

/// One user's usage account.
#[derive(Debug, Clone, Default)]
struct Account {
    /// Usage in inflated core-seconds.
    inflated: f64,
    /// Cores the user's running tasks hold now.
    running_cores: u64,
    /// Time up to which running cores have been accrued.
    accrued_until: Millis,
}

/// Decaying usage per user. See the module documentation for the method.
#[derive(Debug, Clone)]
pub struct FairShare {
    /// Half-life in milliseconds; 0: no decay.
    half_life: Millis,
    /// The time at which the inflation factor is 1.
    base: Millis,
    users: BTreeMap<u32, Account>,
    /// The sum over all users, accrued the same way, so that the total is
    /// known in O(1).
    total: Account,
}

impl FairShare {
    /// No usage yet; usage halves every `half_life` (never decays when 0).
    pub fn new(half_life: Millis) -> Self {
        Self { half_life, base: 0, users: BTreeMap::new(), total: Account::default() }
    }

    /// `2^((t - base)/h)`; below 1 for a time before `base` (an account not
    /// accrued since the last renormalization).
    fn inflation(&self, t: Millis) -> f64 {
        if self.half_life == 0 {
            return 1.0;
        }
        ((t as f64 - self.base as f64) / self.half_life as f64).exp2()
    }

    /// Inflated core-seconds that `cores` cores used from `from` to `to`:
    /// the integral of `cores × 2^((s - base)/h)` over `s`, in seconds.
    fn inflated_use(&self, cores: u64, from: Millis, to: Millis) -> f64 {
        if cores == 0 || to <= from {
            return 0.0;
        }
        let cores = cores as f64;
        if self.half_life == 0 {
            return cores * (to - from) as f64 / 1000.0;
        }
        // h/ln2 × (2^((to-base)/h) − 2^((from-base)/h)), written with expm1 so
        // that a short interval loses no precision.
        let h = self.half_life as f64;
        let rate = std::f64::consts::LN_2 / h;
        cores * self.inflation(from) * ((to - from) as f64 * rate).exp_m1() / rate / 1000.0
    }

    fn accrue(&self, account: &Account, now: Millis) -> f64 {
        account.inflated + self.inflated_use(account.running_cores, account.accrued_until, now)
    }

    fn accrue_user(&mut self, user: u32, now: Millis) {
        let (inflated, until) = match self.users.get(&user) {
            Some(a) => (self.accrue(a, now), a.accrued_until.max(now)),
            None => (0.0, now),
        };
        let account = self.users.entry(user).or_default();
        account.inflated = inflated;
        account.accrued_until = until;
        self.total.inflated = self.accrue(&self.total, now);
        self.total.accrued_until = self.total.accrued_until.max(now);
        self.renormalize_if_needed(now);
    }

    /// Makes `user` known (its share counts from now on), with no usage.
    pub fn add_user(&mut self, user: u32, now: Millis) {
        self.accrue_user(user, now);
    }

    /// `user` started (`delta > 0`) or stopped (`delta < 0`) using `|delta|` cores at `now`.
    pub fn change_running(&mut self, user: u32, delta: i64, now: Millis) {
        self.accrue_user(user, now);
        let account = self.users.get_mut(&user).expect("accrued above");
        account.running_cores =
            account.running_cores.checked_add_signed(delta).expect("running cores below 0");
        self.total.running_cores =
            self.total.running_cores.checked_add_signed(delta).expect("running cores below 0");
    }

    /// Accrues every user's running cores up to `now` (and renormalizes when due).
    pub fn accrue_all(&mut self, now: Millis) {
        let users: Vec<u32> = self.users.keys().copied().collect();
        for user in users {
            self.accrue_user(user, now);
        }
    }

    fn renormalize_if_needed(&mut self, now: Millis) {
        if self.half_life == 0
            || (now.saturating_sub(self.base)) as f64 / (self.half_life as f64) < RENORMALIZE_DOUBLINGS
        {
            return;
        }
        let scale = self.inflation(now);
        for account in self.users.values_mut() {
            account.inflated /= scale;
        }
        self.total.inflated /= scale;
        self.base = now;
    }

    /// The decayed usage of `user` at `now`, in core-seconds.
    pub fn usage(&self, user: u32, now: Millis) -> f64 {
        self.users.get(&user).map_or(0.0, |a| self.accrue(a, now) / self.inflation(now))
    }

    /// Every known user's decayed usage at `now`, in core-seconds (running
    /// tasks accrued up to `now`), by uid.
    pub fn usages(&self, now: Millis) -> Vec<(u32, f64)> {
        self.users.iter().map(|(&user, a)| (user, self.accrue(a, now) / self.inflation(now))).collect()
    }

    /// Adds `core_seconds` of usage to `user` as of `now` (usage a restarted
    /// server read back, already decayed to `now`); the user becomes known.
    /// Negative or non-finite amounts are ignored.
    pub fn restore_usage(&mut self, user: u32, core_seconds: f64, now: Millis) {
        self.accrue_user(user, now);
        if !core_seconds.is_finite() || core_seconds <= 0.0 {
            return;
        }
        let inflated = core_seconds * self.inflation(now);
        self.users.get_mut(&user).expect("accrued above").inflated += inflated;
        self.total.inflated += inflated;
    }

    /// The decayed usage of every user together at `now`, in core-seconds.
    pub fn total_usage(&self, now: Millis) -> f64 {
        self.accrue(&self.total, now) / self.inflation(now)
    }

    /// Number of users known.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Cores `user`'s tasks hold now.
    pub fn running_cores(&self, user: u32) -> u64 {
        self.users.get(&user).map_or(0, |a| a.running_cores)
    }

    /// The fair-share factor `2^(-U/S)` of `user` at `now`: 1 for no usage,
    /// 0.5 for exactly its share, towards 0 above.
    pub fn factor(&self, user: u32, now: Millis) -> f64 {
        let total = self.accrue(&self.total, now);
        if total <= 0.0 {
            return 1.0;
        }
        let mine = self.users.get(&user).map_or(0.0, |a| self.accrue(a, now));
        let share = 1.0 / self.users.len().max(1) as f64;
        (-(mine / total) / share).exp2()
    }

    /// Checks the invariants: the total is the sum of the users.
    pub fn sanity_check(&self, now: Millis) {
        let running: u64 = self.users.values().map(|a| a.running_cores).sum();
        assert_eq!(running, self.total.running_cores, "fair share: running cores of users and total differ");
        let sum: f64 = self.users.values().map(|a| self.accrue(a, now)).sum();
        let total = self.accrue(&self.total, now);
        assert!(
            (sum - total).abs() <= 1e-6 * total.max(1.0),
            "fair share: usage of users {sum} and total {total} differ"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Millis = 1000;

    #[test]
    fn usage_accrues_while_running_and_halves_every_half_life() {
        let h = 1000 * SEC;
        let mut fs = FairShare::new(h);
        fs.change_running(7, 2, 0);
        // While running, usage is the decayed integral of 2 cores.
        let expected =
            |t: f64| 2.0 * (h as f64 / 1000.0) / std::f64::consts::LN_2 * (1.0 - (-t / 1000.0).exp2());
        let u = fs.usage(7, 100 * SEC);
        assert!((u - expected(100.0)).abs() < 1e-9, "{u} vs {}", expected(100.0));
        fs.change_running(7, -2, 100 * SEC);
        let at_end = fs.usage(7, 100 * SEC);
        assert!((at_end - expected(100.0)).abs() < 1e-9);
        assert!(at_end > 190.0 && at_end < 200.0);
        // One half-life later it is half, two later a quarter.
        assert!((fs.usage(7, 100 * SEC + h) - at_end / 2.0).abs() < 1e-9);
        assert!((fs.usage(7, 100 * SEC + 2 * h) - at_end / 4.0).abs() < 1e-9);
        fs.sanity_check(100 * SEC + h);
    }

    #[test]
    fn restored_usage_decays_and_weighs_like_usage_accrued_here() {
        let h = 100 * SEC;
        let mut fs = FairShare::new(h);
        fs.change_running(1, 2, 0);
        fs.change_running(1, -2, 50 * SEC);
        fs.add_user(2, 0);
        let saved = fs.usages(50 * SEC);
        assert_eq!(saved.len(), 2);
        // Read back by a fresh account at another time base.
        let mut back = FairShare::new(h);
        for &(user, u) in &saved {
            back.restore_usage(user, u, 7 * SEC);
        }
        assert_eq!(back.users(), 2);
        let (u1, then) = (saved[0].1, back.usage(1, 7 * SEC));
        assert!((u1 - then).abs() < 1e-9 * u1, "{u1} vs {then}");
        assert!((back.usage(1, 7 * SEC + h) - u1 / 2.0).abs() < 1e-9 * u1);
        assert_eq!(back.usage(2, 7 * SEC), 0.0);
        assert!((back.factor(1, 7 * SEC) - fs.factor(1, 50 * SEC)).abs() < 1e-12);
        back.restore_usage(3, f64::NAN, 7 * SEC);
        back.restore_usage(3, -5.0, 7 * SEC);
        assert_eq!(back.usage(3, 7 * SEC), 0.0);
        back.sanity_check(8 * SEC);
    }

    #[test]
    fn no_decay_with_zero_half_life() {
        let mut fs = FairShare::new(0);
        fs.change_running(1, 3, 0);
        fs.change_running(1, -3, 10 * SEC);
        assert_eq!(fs.usage(1, 10 * SEC), 30.0);
        assert_eq!(fs.usage(1, 1_000_000 * SEC), 30.0);
    }

    #[test]
    fn renormalization_keeps_usage_and_ratios() {
        let h = 10 * SEC;
        let mut fs = FairShare::new(h);
        fs.change_running(1, 1, 0);
        fs.change_running(2, 3, 0);
        // 100 half-lives: the inflation would be 2^100 without renormalizing.
        let mut t = 0;
        for _ in 0..100 {
            t += h;
            fs.accrue_all(t);
        }
        assert!(fs.base > 0, "renormalized");
        let (u1, u2) = (fs.usage(1, t), fs.usage(2, t));
        // Steady state of a constant rate r: r × h / ln2 core-seconds.
        let steady = 10.0 / std::f64::consts::LN_2;
        assert!((u1 - steady).abs() < 1e-6 * steady, "{u1} vs {steady}");
        assert!((u2 / u1 - 3.0).abs() < 1e-9);
        fs.sanity_check(t);
    }

    #[test]
    fn factor_is_half_at_the_share_and_one_without_usage() {
        let mut fs = FairShare::new(0);
        fs.add_user(1, 0);
        fs.add_user(2, 0);
        assert_eq!(fs.factor(1, 0), 1.0);
        fs.change_running(1, 1, 0);
        fs.change_running(2, 1, 0);
        assert_eq!(fs.factor(1, 10 * SEC), 0.5);
        fs.change_running(2, -1, 10 * SEC);
        // User 1 has 30 of 40 core-seconds: 3/4 against a share of 1/2.
        let f1 = fs.factor(1, 30 * SEC);
        let f2 = fs.factor(2, 30 * SEC);
        assert!((f1 - (-1.5f64).exp2()).abs() < 1e-12, "{f1}");
        assert!((f2 - (-0.5f64).exp2()).abs() < 1e-12, "{f2}");
    }
}
