//! One node's free resources and the placement of one chunk on it.
//!
//! Free cores are a bitmap (`u64` words, core `c` is bit `c % 64` of word
//! `c / 64`); per-domain and per-group free counts are kept beside it, so
//! choosing a NUMA node or an L3 compares a few counters and taking cores
//! scans only the words of the chosen group's mask. Placement is split into a
//! read-only *plan* (which domains, how many cores and bytes from each), made
//! while the cluster index is being searched, and [`NodeState::apply`], which
//! picks the actual cores and updates the counts.

use std::sync::Arc;

use super::shape::Layout;
use super::{NodeAllocation, NodeId};

/// How a chunk will be placed on a node, decided before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// Compact, inside one domain: `cores` cores and `mem` bytes from it.
    Domain {
        /// The domain.
        dom: u32,
        /// Cores.
        cores: u32,
        /// Bytes.
        mem: u64,
    },
    /// Across domains: cores per domain, and bytes per domain.
    Spread {
        /// (domain, cores), cores > 0.
        takes: Vec<(u32, u32)>,
        /// (domain, bytes), bytes > 0, domains ascending.
        mem: Vec<(u32, u64)>,
        /// Spread the cores of each domain over its L3 caches (scatter)
        /// instead of packing them (compact).
        scatter: bool,
    },
    /// The whole node.
    Whole,
}

impl Plan {
    /// Number of NUMA nodes the plan touches (cores or memory).
    pub(super) fn domains(&self) -> usize {
        match self {
            Plan::Domain { .. } => 1,
            Plan::Spread { takes, mem, .. } => {
                takes.len() + mem.iter().filter(|(d, _)| !takes.iter().any(|(t, _)| t == d)).count()
            }
            Plan::Whole => usize::MAX,
        }
    }
}

/// One node's free resources.
#[derive(Debug, Clone)]
pub(super) struct NodeState {
    pub(super) id: NodeId,
    pub(super) layout: Arc<Layout>,
    /// Free cores.
    pub(super) free: Vec<u64>,
    pub(super) dom_free: Vec<u32>,
    /// Free memory per domain.
    pub(super) dom_mem: Vec<u64>,
    pub(super) grp_free: Vec<u32>,
    /// Free GPUs, a bitmap.
    pub(super) gpu_free: Vec<u64>,
    pub(super) free_cores: u32,
    pub(super) free_mem: u64,
    pub(super) free_gpus: u32,
    /// Largest entry of `dom_free`.
    pub(super) max_dom_free: u32,
    /// A domain whose free cores are `max_dom_free`.
    top_dom: u32,
    /// Largest entry of `dom_free` other than `top_dom`'s (0 with one domain).
    second_dom_free: u32,
    /// `max_dom_free + second_dom_free`: the most free cores in two domains.
    pub(super) top2_free: u32,
}

impl NodeState {
    /// A node with everything free.
    pub(super) fn new(id: NodeId, layout: Arc<Layout>) -> Self {
        let mut gpu_free = vec![0u64; super::shape::words_for(layout.ngpus)];
        for g in 0..layout.ngpus {
            gpu_free[(g / 64) as usize] |= 1 << (g % 64);
        }
        let mut node = NodeState {
            id,
            free: layout.all.clone(),
            dom_free: layout.dom_cores.clone(),
            dom_mem: layout.dom_cap.clone(),
            grp_free: layout.grp_cores.clone(),
            gpu_free,
            free_cores: layout.ncores,
            free_mem: layout.memory,
            free_gpus: layout.ngpus,
            max_dom_free: 0,
            top_dom: 0,
            second_dom_free: 0,
            top2_free: 0,
            layout,
        };
        node.summarize();
        node
    }

    /// Whether nothing of the node is in use.
    #[inline]
    pub(super) fn is_idle(&self) -> bool {
        self.free_cores == self.layout.ncores
            && self.free_mem == self.layout.memory
            && self.free_gpus == self.layout.ngpus
    }

    #[inline]
    fn gpu_is_free(&self, g: u32) -> bool {
        self.gpu_free[(g / 64) as usize] >> (g % 64) & 1 == 1
    }

    /// Free GPUs local to domain `d`.
    fn local_free_gpus(&self, d: usize) -> u32 {
        (0..self.layout.ngpus)
            .filter(|&g| self.layout.gpu_dom[g as usize] == Some(d as u32) && self.gpu_is_free(g))
            .count() as u32
    }

    /// The domain with the fewest free cores that still has `cores` free cores,
    /// `mem` free bytes and `local_gpus` free local GPUs (best fit).
    #[inline]
    pub(super) fn best_domain(&self, cores: u32, mem: u64, local_gpus: u32) -> Option<u32> {
        let mut best: Option<usize> = None;
        for (d, &f) in self.dom_free.iter().enumerate() {
            if f >= cores
                && self.dom_mem[d] >= mem
                && best.is_none_or(|b| f < self.dom_free[b])
                && (local_gpus == 0 || self.local_free_gpus(d) >= local_gpus)
            {
                best = Some(d);
                if f == cores {
                    break; // an exact fit cannot be beaten
                }
            }
        }
        best.map(|d| d as u32)
    }

    /// A compact plan over several domains: the fewest domains that hold
    /// `cores` cores (largest first, the last one the best fit for what is
    /// left, preferring the first domain's package), memory split over them
    /// in proportion to their cores, then from other domains with the most
    /// free memory if they cannot hold it.
    pub(super) fn span_plan(&self, cores: u32, mem: u64) -> Option<Plan> {
        if self.free_cores < cores || self.free_mem < mem {
            return None;
        }
        let ndom = self.layout.ndom();
        let mut takes: Vec<(u32, u32)> = Vec::new();
        let used = |takes: &[(u32, u32)], d: usize| takes.iter().any(|&(t, _)| t as usize == d);
        let mut remaining = cores;
        let mut package = None;
        while remaining > 0 {
            // (other package, free) smallest among domains that can finish;
            // (same package, free) largest among the others.
            let mut finish: Option<(bool, u32, usize)> = None;
            let mut largest: Option<(bool, u32, usize)> = None;
            for d in 0..ndom {
                let f = self.dom_free[d];
                if f == 0 || used(&takes, d) {
                    continue;
                }
                let foreign = package.is_some_and(|p| p != self.layout.dom_package[d]);
                if f >= remaining {
                    if finish.is_none_or(|(bf, bfree, _)| (foreign, f) < (bf, bfree)) {
                        finish = Some((foreign, f, d));
                    }
                } else if largest.is_none_or(|(lf, lfree, _)| f > lfree || (f == lfree && !foreign && lf)) {
                    largest = Some((foreign, f, d));
                }
            }
            let (d, t) = match (finish, largest) {
                (Some((_, _, d)), _) => (d, remaining),
                (None, Some((_, f, d))) => (d, f),
                (None, None) => return None,
            };
            package.get_or_insert(self.layout.dom_package[d]);
            takes.push((d as u32, t));
            remaining -= t;
        }
        let mem = self.split_mem(mem, &takes)?;
        Some(Plan::Spread { takes, mem, scatter: false })
    }

    /// A scatter plan: cores dealt one at a time to the domains with free
    /// cores, most free first, round after round; memory split evenly over
    /// the domains that got cores.
    pub(super) fn scatter_plan(&self, cores: u32, mem: u64) -> Option<Plan> {
        if self.free_cores < cores || self.free_mem < mem {
            return None;
        }
        let mut order: Vec<u32> =
            (0..self.layout.ndom() as u32).filter(|&d| self.dom_free[d as usize] > 0).collect();
        order.sort_by_key(|&d| (std::cmp::Reverse(self.dom_free[d as usize]), d));
        let mut takes: Vec<(u32, u32)> = order.iter().map(|&d| (d, 0)).collect();
        let mut remaining = cores;
        while remaining > 0 {
            for (d, t) in takes.iter_mut() {
                if remaining == 0 {
                    break;
                }
                if *t < self.dom_free[*d as usize] {
                    *t += 1;
                    remaining -= 1;
                }
            }
        }
        takes.retain(|&(_, t)| t > 0);
        let even: Vec<(u32, u32)> = takes.iter().map(|&(d, _)| (d, 1)).collect();
        let mem = self.split_mem(mem, &even)?;
        Some(Plan::Spread { takes, mem, scatter: true })
    }

    /// Splits `mem` bytes over domains in proportion to `weights`
    /// ((domain, weight)), never beyond a domain's free memory; what they
    /// cannot hold comes from the other domains, most free memory first.
    /// Returns (domain, bytes) with bytes > 0, domains ascending.
    fn split_mem(&self, mem: u64, weights: &[(u32, u32)]) -> Option<Vec<(u32, u64)>> {
        if mem == 0 {
            return Some(Vec::new());
        }
        if self.free_mem < mem {
            return None;
        }
        let total: u64 = weights.iter().map(|&(_, w)| u64::from(w)).sum();
        let mut out: Vec<(u32, u64)> = Vec::with_capacity(weights.len() + 1);
        let mut left = mem;
        if total > 0 {
            let shares: Vec<u64> = weights
                .iter()
                .map(|&(_, w)| (u128::from(mem) * u128::from(w) / u128::from(total)) as u64)
                .collect();
            let rounding = mem - shares.iter().sum::<u64>();
            for (i, (&(d, _), &share)) in weights.iter().zip(&shares).enumerate() {
                let want = share + if i == 0 { rounding } else { 0 };
                let give = want.min(self.dom_mem[d as usize]);
                out.push((d, give));
                left -= give;
            }
            for (d, given) in out.iter_mut() {
                let more = left.min(self.dom_mem[*d as usize] - *given);
                *given += more;
                left -= more;
            }
        }
        while left > 0 {
            let d = (0..self.layout.ndom())
                .filter(|&d| self.dom_mem[d] > 0 && !out.iter().any(|&(o, _)| o as usize == d))
                .max_by_key(|&d| (self.dom_mem[d], std::cmp::Reverse(d)))?;
            let give = left.min(self.dom_mem[d]);
            out.push((d as u32, give));
            left -= give;
        }
        out.retain(|&(_, b)| b > 0);
        out.sort_unstable_by_key(|&(d, _)| d);
        Some(out)
    }

    /// Takes what `plan` says plus `gpus` GPUs (local to the plan's domains
    /// first, then those of unknown locality, then any).
    pub(super) fn apply(&mut self, plan: &Plan, gpus: u32) -> NodeAllocation {
        let mut cores;
        let mut mem;
        let gpu_list;
        match plan {
            &Plan::Domain { dom, cores: n, mem: bytes } => {
                let d = dom as usize;
                let before = self.dom_free[d];
                cores = Vec::with_capacity(n as usize);
                self.take_packed(d, n, &mut cores);
                self.shrank(d, before);
                mem = Vec::with_capacity(usize::from(bytes > 0));
                if bytes > 0 {
                    self.dom_mem[d] -= bytes;
                    self.free_mem -= bytes;
                    mem.push((self.layout.dom_os[d], bytes));
                }
                gpu_list = self.take_gpus(gpus, &[dom]);
            }
            Plan::Spread { takes, mem: bytes, scatter } => {
                cores = Vec::with_capacity(takes.iter().map(|&(_, t)| t as usize).sum());
                for &(d, t) in takes {
                    if *scatter {
                        self.take_spread(d as usize, t, &mut cores);
                    } else {
                        self.take_packed(d as usize, t, &mut cores);
                    }
                }
                mem = Vec::with_capacity(bytes.len());
                for &(d, b) in bytes {
                    self.dom_mem[d as usize] -= b;
                    self.free_mem -= b;
                    mem.push((self.layout.dom_os[d as usize], b));
                }
                let doms: Vec<u32> = takes.iter().map(|&(d, _)| d).collect();
                gpu_list = self.take_gpus(gpus, &doms);
                self.summarize();
            }
            Plan::Whole => {
                debug_assert!(self.is_idle());
                cores = (0..self.layout.ncores).collect();
                self.free.iter_mut().for_each(|w| *w = 0);
                self.dom_free.iter_mut().for_each(|f| *f = 0);
                self.grp_free.iter_mut().for_each(|f| *f = 0);
                self.free_cores = 0;
                mem = Vec::with_capacity(self.dom_mem.len());
                for (d, m) in self.dom_mem.iter_mut().enumerate() {
                    if *m > 0 {
                        mem.push((self.layout.dom_os[d], *m));
                    }
                    *m = 0;
                }
                self.free_mem = 0;
                gpu_list = self.take_gpus(self.layout.ngpus, &[]);
                self.summarize();
            }
        }
        // Cores come out of each group in ascending order: one group needs no sort.
        if !cores.windows(2).all(|w| w[0] < w[1]) {
            cores.sort_unstable();
        }
        let core_pus = &self.layout.shape.core_pus;
        let mut pus = Vec::with_capacity(cores.len() * self.layout.max_pus_per_core);
        for &c in &cores {
            pus.extend_from_slice(&core_pus[c as usize]);
        }
        NodeAllocation { node: self.id, cores, pus, mem, gpus: gpu_list }
    }

    /// Takes `n` cores of domain `d` from as few groups as possible: the
    /// best-fitting group if one can hold them all, else the largest groups
    /// first and the best fit for the rest.
    fn take_packed(&mut self, d: usize, n: u32, out: &mut Vec<u32>) {
        let (g0, g1) = self.layout.dom_groups[d];
        let mut remaining = n;
        while remaining > 0 {
            let mut fit: Option<usize> = None;
            let mut largest: Option<usize> = None;
            for g in g0 as usize..g1 as usize {
                let f = self.grp_free[g];
                if f >= remaining {
                    if fit.is_none_or(|b| f < self.grp_free[b]) {
                        fit = Some(g);
                    }
                } else if f > 0 && largest.is_none_or(|l| f > self.grp_free[l]) {
                    largest = Some(g);
                }
            }
            let (g, t) = match (fit, largest) {
                (Some(g), _) => (g, remaining),
                (None, Some(g)) => (g, self.grp_free[g]),
                (None, None) => unreachable!("domain {d} has fewer than {n} free cores"),
            };
            self.take_from_group(g, t, out);
            remaining -= t;
        }
    }

    /// Takes `n` cores of domain `d`, one per group in turn.
    fn take_spread(&mut self, d: usize, n: u32, out: &mut Vec<u32>) {
        let (g0, g1) = self.layout.dom_groups[d];
        let mut remaining = n;
        while remaining > 0 {
            let before = remaining;
            for g in g0 as usize..g1 as usize {
                if remaining > 0 && self.grp_free[g] > 0 {
                    self.take_from_group(g, 1, out);
                    remaining -= 1;
                }
            }
            assert!(remaining < before, "domain {d} has fewer than {n} free cores");
        }
    }

    /// Takes the `n` lowest free cores of group `g`.
    #[inline]
    fn take_from_group(&mut self, g: usize, n: u32, out: &mut Vec<u32>) {
        let words = self.layout.words;
        let mask = &self.layout.grp_mask[g * words..(g + 1) * words];
        let mut left = n;
        for (w, (free, &m)) in self.free.iter_mut().zip(mask).enumerate() {
            let mut bits = *free & m;
            while bits != 0 && left > 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                *free &= !(1u64 << b);
                out.push(w as u32 * 64 + b);
                left -= 1;
            }
            if left == 0 {
                break;
            }
        }
        debug_assert_eq!(left, 0, "group {g} had fewer than {n} free cores");
        self.grp_free[g] -= n;
        self.dom_free[self.layout.grp_dom[g] as usize] -= n;
        self.free_cores -= n;
    }

    /// Takes `n` free GPUs: local to `doms` first, then of unknown locality,
    /// then any.
    fn take_gpus(&mut self, n: u32, doms: &[u32]) -> Vec<u32> {
        if n == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(n as usize);
        for pass in 0..3 {
            for g in 0..self.layout.ngpus {
                if out.len() == n as usize {
                    break;
                }
                let home = self.layout.gpu_dom[g as usize];
                let wanted = match pass {
                    0 => home.is_some_and(|h| doms.contains(&h)),
                    1 => home.is_none(),
                    _ => true,
                };
                if wanted && self.gpu_is_free(g) {
                    self.gpu_free[(g / 64) as usize] &= !(1 << (g % 64));
                    out.push(g);
                }
            }
        }
        debug_assert_eq!(out.len(), n as usize, "fewer than {n} free GPUs");
        self.free_gpus -= out.len() as u32;
        out.sort_unstable();
        out
    }

    /// Returns what `a` took. If `a` names anything this node does not have
    /// in use (a core already free, more memory than was taken, an unknown
    /// NUMA node or GPU), nothing changes and the error says what.
    pub(super) fn release(&mut self, a: &NodeAllocation) -> Result<(), String> {
        // Cores: give back one by one, undoing on the first bad one.
        let mut bad_core = None;
        for (i, &c) in a.cores.iter().enumerate() {
            if c >= self.layout.ncores || self.free[(c / 64) as usize] >> (c % 64) & 1 == 1 {
                bad_core = Some((i, c));
                break;
            }
            self.free[(c / 64) as usize] |= 1 << (c % 64);
            let (g, d) =
                (self.layout.core_grp[c as usize] as usize, self.layout.core_dom[c as usize] as usize);
            self.grp_free[g] += 1;
            self.dom_free[d] += 1;
            self.grew(d);
        }
        if let Some((i, c)) = bad_core {
            a.cores[..i].iter().for_each(|&c| self.retake_core(c));
            self.summarize();
            return Err(format!("core {c} is not in use"));
        }
        self.free_cores += a.cores.len() as u32;
        let layout: &Layout = &self.layout;
        let mut bad_mem = None;
        for (i, &(os, bytes)) in a.mem.iter().enumerate() {
            match layout.dom_of_os(os).filter(|&d| layout.dom_cap[d] - self.dom_mem[d] >= bytes) {
                Some(d) => {
                    self.dom_mem[d] += bytes;
                    self.free_mem += bytes;
                }
                None => {
                    bad_mem = Some((i, os, bytes));
                    break;
                }
            }
        }
        if let Some((i, os, bytes)) = bad_mem {
            self.undo_release(a, i, 0);
            return Err(format!("{bytes} bytes on NUMA node {os} are not in use"));
        }
        for (i, &g) in a.gpus.iter().enumerate() {
            if g >= self.layout.ngpus || self.gpu_is_free(g) {
                self.undo_release(a, a.mem.len(), i);
                return Err(format!("GPU {g} is not in use"));
            }
            self.gpu_free[(g / 64) as usize] |= 1 << (g % 64);
            self.free_gpus += 1;
        }
        Ok(())
    }

    /// Takes exactly the resources of `a` (the inverse of
    /// [`NodeState::release`]), for a task that is already running, e.g. one
    /// an agent reports after a restart of the server. If any of them is not
    /// free (a core in use, more memory than is free on a NUMA node, a GPU in
    /// use), nothing changes and the error says what.
    pub(super) fn take(&mut self, a: &NodeAllocation) -> Result<(), String> {
        for &c in &a.cores {
            if c >= self.layout.ncores || self.free[(c / 64) as usize] >> (c % 64) & 1 == 0 {
                return Err(format!("core {c} is not free"));
            }
        }
        let mut want = vec![0u64; self.dom_mem.len()];
        for &(os, bytes) in &a.mem {
            let d = self.layout.dom_of_os(os).ok_or_else(|| format!("no NUMA node {os}"))?;
            want[d] += bytes;
        }
        if let Some(d) = want.iter().zip(&self.dom_mem).position(|(w, free)| w > free) {
            return Err(format!("{} bytes are not free on NUMA domain {d}", want[d]));
        }
        for &g in &a.gpus {
            if g >= self.layout.ngpus || !self.gpu_is_free(g) {
                return Err(format!("GPU {g} is not free"));
            }
        }
        for &c in &a.cores {
            self.retake_core(c);
        }
        self.free_cores -= a.cores.len() as u32;
        for (d, w) in want.into_iter().enumerate() {
            self.dom_mem[d] -= w;
            self.free_mem -= w;
        }
        for &g in &a.gpus {
            self.gpu_free[(g / 64) as usize] &= !(1 << (g % 64));
            self.free_gpus -= 1;
        }
        self.summarize();
        Ok(())
    }

    /// Undoes a partial [`NodeState::release`]: all of `a`'s cores, its first
    /// `mem` memory entries and its first `gpus` GPUs.
    #[cold]
    fn undo_release(&mut self, a: &NodeAllocation, mem: usize, gpus: usize) {
        for &g in &a.gpus[..gpus] {
            self.gpu_free[(g / 64) as usize] &= !(1 << (g % 64));
            self.free_gpus -= 1;
        }
        for &(os, b) in &a.mem[..mem] {
            let d = self.layout.dom_of_os(os).expect("released just now");
            self.dom_mem[d] -= b;
            self.free_mem -= b;
        }
        self.free_cores -= a.cores.len() as u32;
        a.cores.iter().for_each(|&c| self.retake_core(c));
        self.summarize();
    }

    /// Marks a just-released core used again (undo of [`NodeState::release`];
    /// the caller fixes `free_cores`).
    fn retake_core(&mut self, c: u32) {
        self.free[(c / 64) as usize] &= !(1 << (c % 64));
        self.grp_free[self.layout.core_grp[c as usize] as usize] -= 1;
        self.dom_free[self.layout.core_dom[c as usize] as usize] -= 1;
    }

    /// Recomputes `max_dom_free`, `second_dom_free` and `top2_free` (the
    /// index keys) from `dom_free`.
    pub(super) fn summarize(&mut self) {
        let (top, top1, top2) = top_two(&self.dom_free);
        self.top_dom = top as u32;
        self.max_dom_free = top1;
        self.second_dom_free = top2;
        self.top2_free = top1 + top2;
    }

    /// Updates the summary after domain `d` gained free cores.
    #[inline]
    fn grew(&mut self, d: usize) {
        let v = self.dom_free[d];
        if d == self.top_dom as usize {
            self.max_dom_free = v;
        } else if v > self.max_dom_free {
            self.second_dom_free = self.max_dom_free;
            self.max_dom_free = v;
            self.top_dom = d as u32;
        } else if v > self.second_dom_free {
            self.second_dom_free = v;
        }
        self.top2_free = self.max_dom_free + self.second_dom_free;
    }

    /// Updates the summary after domain `d` lost free cores (it had
    /// `before`): only a domain among the two largest changes it.
    #[inline]
    fn shrank(&mut self, d: usize, before: u32) {
        if d == self.top_dom as usize || before >= self.second_dom_free {
            self.summarize();
        }
    }

    /// How many domains a compact chunk of `cores` cores needs at least:
    /// the fewest whose free cores add up to it (memory not counted).
    pub(super) fn domains_for(&self, cores: u32) -> usize {
        if cores <= self.max_dom_free {
            return 1;
        }
        if cores <= self.top2_free {
            return 2;
        }
        if cores > self.free_cores {
            return usize::MAX;
        }
        let mut free: Vec<u32> = self.dom_free.clone();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let mut sum = 0;
        free.iter()
            .position(|&f| {
                sum += f;
                sum >= cores
            })
            .map_or(usize::MAX, |i| i + 1)
    }

    /// Checks bitmaps against counts and capacities; panics with what is wrong.
    pub(super) fn check(&self) {
        let l = &self.layout;
        let id = self.id;
        let count =
            |mask: &[u64]| -> u32 { self.free.iter().zip(mask).map(|(f, m)| (f & m).count_ones()).sum() };
        assert!(
            self.free.iter().zip(&l.all).all(|(f, a)| f & !a == 0),
            "node {id:?}: free bit beyond the cores"
        );
        let free = count(&l.all);
        assert_eq!(free, self.free_cores, "node {id:?}: free core count");
        for d in 0..l.ndom() {
            assert_eq!(count(l.dom_mask(d)), self.dom_free[d], "node {id:?}: free cores of NUMA domain {d}");
            assert!(
                self.dom_mem[d] <= l.dom_cap[d],
                "node {id:?}: free memory of NUMA domain {d} above capacity"
            );
            let (g0, g1) = l.dom_groups[d];
            let in_groups: u32 = (g0..g1).map(|g| self.grp_free[g as usize]).sum();
            assert_eq!(in_groups, self.dom_free[d], "node {id:?}: groups of domain {d} vs domain");
        }
        for g in 0..l.grp_cores.len() {
            assert_eq!(count(l.grp_mask(g)), self.grp_free[g], "node {id:?}: free cores of L3 group {g}");
        }
        assert_eq!(self.dom_mem.iter().sum::<u64>(), self.free_mem, "node {id:?}: free memory");
        let (_, top1, top2) = top_two(&self.dom_free);
        assert_eq!(self.max_dom_free, top1, "node {id:?}: largest free NUMA domain");
        assert_eq!(
            self.dom_free[self.top_dom as usize], top1,
            "node {id:?}: domain with the most free cores"
        );
        assert_eq!(self.second_dom_free, top2, "node {id:?}: second largest free NUMA domain");
        assert_eq!(self.top2_free, top1 + top2, "node {id:?}: two largest free NUMA domains");
        let gpus = (0..l.ngpus).filter(|&g| self.gpu_is_free(g)).count() as u32;
        assert_eq!(gpus, self.free_gpus, "node {id:?}: free GPU count");
        let stray: u32 = self.gpu_free.iter().map(|w| w.count_ones()).sum();
        assert_eq!(stray, gpus, "node {id:?}: free GPU bit beyond the GPUs");
    }
}

/// The position of the largest entry of `v` (the first of equals), the
/// largest and the largest of the others (0 for missing ones). Three
/// branch-free passes, which the compiler vectorises.
fn top_two(v: &[u32]) -> (usize, u32, u32) {
    let a = v.iter().copied().max().unwrap_or(0);
    let at = v.iter().position(|&x| x == a).unwrap_or(0);
    let b = v.iter().enumerate().map(|(i, &x)| if i == at { 0 } else { x }).max().unwrap_or(0);
    (at, a, b)
}
