//! Job numbers set aside for clients (`Reserve`, `SubmitReserved`).
//!
//! A client names its pipelined submissions by numbers the server reserved
//! for its connection, before the server has seen them. On that connection
//! each number names at most one job, taken in increasing order.
//!
//! When the connection goes (the server restarted, or crashed and came
//! back), the client may hold submissions named by those numbers that the
//! server never confirmed, and sends them again on a new connection. So a
//! reservation outlives its connection for [`ORPHAN_TTL`], as an *orphan*
//! of the user who made it. A submission of that user under one of its
//! numbers is then:
//!
//! - answered as submitted, changing nothing, when the job is that user's
//!   already (the first send got through, its reply did not);
//! - queued when no job was ever submitted under the number;
//! - refused when the number is below one used before and no job has it:
//!   it was refused then, or its job ended and was forgotten since, and
//!   queuing it now could run it twice.
//!
//! The journal records every reservation with its user
//! (`Change::ReservedFor`), and again after each snapshot, so that a
//! restart brings them all back as orphans, each with how far it was used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::server::ConnId;

/// How long a reservation outlives its connection.
pub(crate) const ORPHAN_TTL: Duration = Duration::from_secs(600);

/// Most orphans kept; past it the oldest go first.
const MAX_ORPHANS: usize = 1 << 16;

/// Numbers `first..end` set aside for a connection of user `uid`; those
/// below `next` have been used (or skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reservation {
    pub(crate) first: u64,
    pub(crate) next: u64,
    pub(crate) end: u64,
    pub(crate) uid: u32,
}

/// Under which reservation a submission may take its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// The connection's own.
    Live,
    /// An orphan of the caller, starting at `first`. `again` when the
    /// number is below one used before: only a job already there may
    /// answer it.
    Orphan { first: u64, again: bool },
}

/// The reservations of open connections and the orphans of closed ones.
#[derive(Debug, Default)]
pub(super) struct Reservations {
    live: HashMap<ConnId, Reservation>,
    /// By first number; each with when it expires.
    orphans: BTreeMap<u64, (Reservation, Instant)>,
    /// (expiry, first number) of the orphans, oldest first.
    expiry: VecDeque<(Instant, u64)>,
}

impl Reservations {
    /// Gives `conn` a new reservation. The one it replaces needs no orphan:
    /// a client reserves again only once every submission it made under
    /// the old one is answered.
    pub(super) fn reserve(&mut self, conn: ConnId, r: Reservation) {
        self.live.insert(conn, r);
    }

    /// Whether `conn`, of user `uid`, may submit a job under `seq`; the
    /// error says why not.
    pub(super) fn claim(&self, conn: ConnId, uid: u32, seq: u64) -> Result<Claim, String> {
        let live = self.live.get(&conn);
        if live.is_some_and(|r| (r.next..r.end).contains(&seq)) {
            return Ok(Claim::Live);
        }
        if let Some((_, (o, _))) = self.orphans.range(..=seq).next_back() {
            if seq < o.end && o.uid == uid {
                return Ok(Claim::Orphan { first: o.first, again: seq < o.next });
            }
        }
        let left = match live {
            Some(r) if r.next < r.end => format!("; numbers {} to {} are left", r.next, r.end - 1),
            _ => String::new(),
        };
        Err(format!(
            "job number {seq} is not reserved by this connection (reserve numbers first; each may be used \
             once, in increasing order){left}"
        ))
    }

    /// Notes that a job was queued under `seq`, as `claim` allowed.
    pub(super) fn used(&mut self, conn: ConnId, claim: Claim, seq: u64) {
        let r = match claim {
            Claim::Live => self.live.get_mut(&conn),
            Claim::Orphan { first, .. } => self.orphans.get_mut(&first).map(|(r, _)| r),
        };
        if let Some(r) = r {
            r.next = r.next.max(seq + 1);
        }
    }

    /// The connection closed: its reservation becomes an orphan.
    pub(super) fn closed(&mut self, conn: ConnId, now: Instant) {
        if let Some(r) = self.live.remove(&conn) {
            self.orphan(r, now);
        }
    }

    /// Takes `r` as an orphan from `now` on (a closed connection's, or one
    /// the journal gave back).
    pub(super) fn orphan(&mut self, r: Reservation, now: Instant) {
        let until = now + ORPHAN_TTL;
        self.orphans.insert(r.first, (r, until));
        self.expiry.push_back((until, r.first));
        while let Some(&(until, first)) = self.expiry.front() {
            if until > now && self.orphans.len() <= MAX_ORPHANS {
                break;
            }
            self.expiry.pop_front();
            // Only if it was not taken again since, with a later expiry.
            if self.orphans.get(&first).is_some_and(|&(_, u)| u == until) {
                self.orphans.remove(&first);
            }
        }
    }

    /// Every reservation, live or orphan: what a restart needs.
    pub(super) fn all(&self) -> impl Iterator<Item = &Reservation> {
        self.live.values().chain(self.orphans.values().map(|(r, _)| r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: u32 = 1000;
    const BOB: u32 = 1001;

    fn block(first: u64, end: u64) -> Reservation {
        Reservation { first, next: first, end, uid: ALICE }
    }

    #[test]
    fn a_closed_connections_numbers_stay_its_users() {
        let (a, b) = (ConnId(1), ConnId(2));
        let mut rs = Reservations::default();
        let now = Instant::now();
        rs.reserve(a, block(10, 20));
        assert_eq!(rs.claim(a, ALICE, 12), Ok(Claim::Live));
        rs.used(a, Claim::Live, 12);
        assert!(rs.claim(a, ALICE, 12).is_err(), "used");
        assert!(rs.claim(b, ALICE, 13).is_err(), "another connection's while it is open");
        rs.closed(a, now);
        assert_eq!(rs.claim(b, ALICE, 12), Ok(Claim::Orphan { first: 10, again: true }));
        assert_eq!(rs.claim(b, ALICE, 13), Ok(Claim::Orphan { first: 10, again: false }));
        assert!(rs.claim(b, BOB, 13).unwrap_err().contains("not reserved"), "another user's");
        assert!(rs.claim(b, ALICE, 20).is_err(), "past its end");
        assert!(rs.claim(b, ALICE, 9).is_err(), "before its start");
        rs.used(b, Claim::Orphan { first: 10, again: false }, 15);
        assert_eq!(rs.claim(b, ALICE, 14), Ok(Claim::Orphan { first: 10, again: true }));
        assert_eq!(rs.claim(b, ALICE, 16), Ok(Claim::Orphan { first: 10, again: false }));
        assert_eq!(rs.all().count(), 1);
    }

    #[test]
    fn orphans_expire_and_are_bounded() {
        let mut rs = Reservations::default();
        let t0 = Instant::now();
        rs.orphan(block(1, 5), t0);
        rs.orphan(block(5, 9), t0 + ORPHAN_TTL / 2);
        assert!(rs.claim(ConnId(1), ALICE, 2).is_ok());
        // Expired ones go when the next one comes.
        rs.orphan(block(9, 12), t0 + ORPHAN_TTL);
        assert!(rs.claim(ConnId(1), ALICE, 2).is_err());
        assert!(rs.claim(ConnId(1), ALICE, 6).is_ok());
        // Taken again (a reservation recorded twice), it lives from then.
        rs.orphan(block(5, 9), t0 + ORPHAN_TTL);
        rs.orphan(block(12, 13), t0 + ORPHAN_TTL * 3 / 2);
        assert!(rs.claim(ConnId(1), ALICE, 6).is_ok());
        let now = t0 + ORPHAN_TTL * 2;
        for k in 0..MAX_ORPHANS as u64 + 10 {
            rs.orphan(block(100 + k, 101 + k), now);
        }
        assert_eq!(rs.orphans.len(), MAX_ORPHANS);
        assert!(rs.claim(ConnId(1), ALICE, 100).is_err(), "the oldest went first");
        assert!(rs.claim(ConnId(1), ALICE, 100 + MAX_ORPHANS as u64 + 9).is_ok());
    }
}
