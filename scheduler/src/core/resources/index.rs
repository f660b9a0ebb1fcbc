//! A bucket queue over small integer keys: the cluster-wide index that finds
//! a node for a request without scanning the cluster.
//!
//! Every node (by slot number) sits in at most one bucket, keyed by a summary
//! of its free resources (see `Resources` for the keys used). Buckets are
//! intrusive doubly linked lists threaded through per-slot `prev`/`next`
//! arrays, so moving a node between buckets is O(1). A two-level bitmap marks
//! the non-empty buckets, as the priority bitmap of Linux's O(1) scheduler
//! (`sched_find_first_bit`) with a summary word per 64 words above it:
//! finding the first non-empty bucket at or above a key reads one word of
//! each level, plus one summary word per 4 096 empty buckets skipped.
//!
//! A slot can enter a bucket at either end: [`BucketQueue::set`] puts it
//! first (most recently changed first), [`BucketQueue::push_back`] last.

/// No slot / no key.
const NONE: u32 = u32::MAX;

/// Buckets over keys `0..keys`, holding slots `0..slots`.
#[derive(Debug, Clone, Default)]
pub(super) struct BucketQueue {
    /// First slot of each bucket, or `NONE`.
    head: Vec<u32>,
    /// Last slot of each bucket, or `NONE`.
    tail: Vec<u32>,
    /// Bit `k` set: bucket `k` is not empty.
    nonempty: Vec<u64>,
    /// Bit `w` set: word `w` of `nonempty` is not zero.
    summary: Vec<u64>,
    /// Each slot's key, or `NONE` when the slot is in no bucket.
    key: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Number of slots in buckets.
    len: usize,
}

impl BucketQueue {
    /// An empty queue over keys `0..keys`.
    #[cfg(test)]
    pub(super) fn new(keys: u32) -> Self {
        let mut q = BucketQueue::default();
        q.set_keys(keys);
        q
    }

    /// Number of keys.
    pub(super) fn keys(&self) -> u32 {
        self.head.len() as u32
    }

    /// Number of slots in buckets.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Changes the key range to `0..keys`, emptying every bucket.
    pub(super) fn set_keys(&mut self, keys: u32) {
        let words = (keys as usize).div_ceil(64);
        self.head = vec![NONE; keys as usize];
        self.tail = vec![NONE; keys as usize];
        self.nonempty = vec![0; words];
        self.summary = vec![0; words.div_ceil(64)];
        self.key.iter_mut().for_each(|k| *k = NONE);
        self.len = 0;
    }

    /// The key of `slot`, if it is in a bucket.
    #[inline]
    pub(super) fn key_of(&self, slot: u32) -> Option<u32> {
        match self.key.get(slot as usize) {
            Some(&k) if k != NONE => Some(k),
            _ => None,
        }
    }

    /// Puts `slot` first in bucket `key` (moving it if it is elsewhere;
    /// leaving it where it is if it is there already).
    #[inline]
    pub(super) fn set(&mut self, slot: u32, key: u32) {
        self.insert(slot, key, true);
    }

    /// Puts `slot` last in bucket `key` (moving it if it is elsewhere;
    /// leaving it where it is if it is there already).
    pub(super) fn push_back(&mut self, slot: u32, key: u32) {
        self.insert(slot, key, false);
    }

    #[inline]
    fn insert(&mut self, slot: u32, key: u32, first: bool) {
        debug_assert!(key < self.keys(), "key {key} out of range {}", self.keys());
        let s = slot as usize;
        if s >= self.key.len() {
            self.key.resize(s + 1, NONE);
            self.prev.resize(s + 1, NONE);
            self.next.resize(s + 1, NONE);
        }
        match self.key[s] {
            k if k == key => return,
            NONE => {}
            _ => self.unlink(slot),
        }
        let (h, t) = (self.head[key as usize], self.tail[key as usize]);
        if h == NONE {
            self.prev[s] = NONE;
            self.next[s] = NONE;
            self.head[key as usize] = slot;
            self.tail[key as usize] = slot;
            self.mark(key, true);
        } else if first {
            self.prev[s] = NONE;
            self.next[s] = h;
            self.prev[h as usize] = slot;
            self.head[key as usize] = slot;
        } else {
            self.prev[s] = t;
            self.next[s] = NONE;
            self.next[t as usize] = slot;
            self.tail[key as usize] = slot;
        }
        self.key[s] = key;
        self.len += 1;
    }

    /// Takes `slot` out of its bucket, if it is in one.
    #[inline]
    pub(super) fn remove(&mut self, slot: u32) {
        if self.key_of(slot).is_some() {
            self.unlink(slot);
            self.key[slot as usize] = NONE;
        }
    }

    fn unlink(&mut self, slot: u32) {
        let s = slot as usize;
        let (p, n, k) = (self.prev[s], self.next[s], self.key[s]);
        if p != NONE {
            self.next[p as usize] = n;
        } else {
            self.head[k as usize] = n;
            if n == NONE {
                self.mark(k, false);
            }
        }
        if n != NONE {
            self.prev[n as usize] = p;
        } else {
            self.tail[k as usize] = p;
        }
        self.len -= 1;
    }

    fn mark(&mut self, key: u32, on: bool) {
        let (w, b) = ((key / 64) as usize, key % 64);
        if on {
            self.nonempty[w] |= 1 << b;
            self.summary[w / 64] |= 1 << (w % 64);
        } else {
            self.nonempty[w] &= !(1 << b);
            if self.nonempty[w] == 0 {
                self.summary[w / 64] &= !(1 << (w % 64));
            }
        }
    }

    /// The first non-empty bucket with a key in `from..`.
    #[inline]
    pub(super) fn next_key(&self, from: u32) -> Option<u32> {
        if from >= self.keys() {
            return None;
        }
        let w = (from / 64) as usize;
        let bits = self.nonempty[w] & (!0u64 << (from % 64));
        if bits != 0 {
            return Some(w as u32 * 64 + bits.trailing_zeros());
        }
        // The next non-zero word of `nonempty`, through the summary.
        let mut sw = (w + 1) / 64;
        let mut mask = !0u64 << ((w + 1) % 64);
        while sw < self.summary.len() {
            let s = self.summary[sw] & mask;
            if s != 0 {
                let word = sw * 64 + s.trailing_zeros() as usize;
                return Some(word as u32 * 64 + self.nonempty[word].trailing_zeros());
            }
            sw += 1;
            mask = !0;
        }
        None
    }

    /// The slots of bucket `key`, first to last.
    #[inline]
    pub(super) fn bucket(&self, key: u32) -> Bucket<'_> {
        Bucket { q: self, at: self.head.get(key as usize).copied().unwrap_or(NONE) }
    }

    /// `(key, slot)` for every slot with a key in `lo..=hi`, keys ascending.
    pub(super) fn range(&self, lo: u32, hi: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        let mut key = self.next_key(lo).filter(|&k| k <= hi);
        let mut at = key.map_or(NONE, |k| self.head[k as usize]);
        std::iter::from_fn(move || {
            let k = key?;
            let slot = at;
            at = self.next[slot as usize];
            if at == NONE {
                key = k.checked_add(1).and_then(|n| self.next_key(n)).filter(|&n| n <= hi);
                at = key.map_or(NONE, |n| self.head[n as usize]);
            }
            Some((k, slot))
        })
    }

    /// Checks the lists against the keys and bitmaps; panics on a mismatch.
    pub(super) fn check(&self, what: &str) {
        let mut seen = 0;
        for key in 0..self.keys() {
            let bit = self.nonempty[(key / 64) as usize] >> (key % 64) & 1 == 1;
            assert_eq!(bit, self.head[key as usize] != NONE, "{what}: bucket {key} non-empty bit");
            let mut prev = NONE;
            for slot in self.bucket(key) {
                assert_eq!(self.key[slot as usize], key, "{what}: slot {slot} listed under {key}");
                assert_eq!(self.prev[slot as usize], prev, "{what}: slot {slot} back link");
                prev = slot;
                seen += 1;
            }
            assert_eq!(self.tail[key as usize], prev, "{what}: bucket {key} tail");
        }
        for (w, &word) in self.nonempty.iter().enumerate() {
            let bit = self.summary[w / 64] >> (w % 64) & 1 == 1;
            assert_eq!(bit, word != 0, "{what}: summary bit of word {w}");
        }
        let keyed = self.key.iter().filter(|&&k| k != NONE).count();
        assert_eq!(seen, keyed, "{what}: slots with a key but in no list");
        assert_eq!(seen, self.len, "{what}: length");
    }
}

/// Iterator over one bucket's slots.
pub(super) struct Bucket<'a> {
    q: &'a BucketQueue,
    at: u32,
}

impl Iterator for Bucket<'_> {
    type Item = u32;

    #[inline]
    fn next(&mut self) -> Option<u32> {
        if self.at == NONE {
            return None;
        }
        let slot = self.at;
        self.at = self.q.next[slot as usize];
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_move_and_next_key_skips_empty_words() {
        let mut q = BucketQueue::new(10_000);
        assert_eq!(q.next_key(0), None);
        q.set(3, 9_000);
        q.set(5, 70);
        q.set(7, 70);
        q.check("q");
        assert_eq!(q.next_key(0), Some(70));
        assert_eq!(q.next_key(71), Some(9_000));
        assert_eq!(q.next_key(9_001), None);
        assert_eq!(q.bucket(70).collect::<Vec<_>>(), [7, 5], "set puts first");
        q.set(5, 4_095);
        assert_eq!(q.range(0, 9_999).collect::<Vec<_>>(), [(70, 7), (4_095, 5), (9_000, 3)]);
        q.push_back(5, 70);
        q.push_back(9, 70);
        q.set(4, 70);
        assert_eq!(q.bucket(70).collect::<Vec<_>>(), [4, 7, 5, 9]);
        q.remove(4);
        q.remove(9);
        q.check("q");
        q.set(5, 4_095);
        assert_eq!(q.range(71, 8_999).collect::<Vec<_>>(), [(4_095, 5)]);
        q.remove(7);
        q.remove(7);
        q.check("q");
        assert_eq!(q.next_key(0), Some(4_095));
        assert_eq!(q.len(), 2);
        q.set_keys(5);
        assert_eq!(q.len(), 0);
        assert_eq!(q.key_of(3), None);
        q.check("q");
    }

    #[test]
    fn next_key_agrees_with_a_linear_scan() {
        let mut q = BucketQueue::new(64 * 64 * 3 + 17);
        let keys = [0, 63, 64, 4_095, 4_096, 8_200, 12_304];
        for (slot, &k) in keys.iter().enumerate() {
            q.set(slot as u32, k);
        }
        for from in 0..q.keys() + 2 {
            let want = keys.iter().copied().filter(|&k| k >= from).min();
            assert_eq!(q.next_key(from), want, "from {from}");
        }
    }
}
