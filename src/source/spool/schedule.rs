//! The due times of the jobs waiting in `retry/`, held in memory so that promoting a retry
//! costs what is due, not what waits.
//!
//! The directory is read once at start (off the main thread), and every retry a worker
//! schedules afterwards is added as it happens. Memory is bounded: at most `cap` entries are
//! held, the earliest ones. When an entry has to be left out, the schedule remembers the
//! earliest due time among those left out; once nothing it holds is due before that time, it
//! asks for the directory to be read again. A downstream outage that sends a million jobs to
//! `retry/` therefore costs one read of the directory per `cap` promotions, not one per
//! promotion.
//!
//! Entries are hints: the promotion itself re-reads the job's record and moves it only if it is
//! still due (a duplicate or stale entry, or a record edited by hand, cannot move a job early).

use std::collections::BTreeSet;
use std::ffi::OsString;

/// At most this many due times are held in memory, about 4 MiB of names.
pub const CAP: usize = 65_536;

#[derive(Debug)]
pub struct RetrySchedule {
    entries: BTreeSet<(u64, OsString)>,
    cap: usize,
    /// The earliest due time of a job in `retry/` that is not held, if any was left out.
    unheld_from: Option<u64>,
}

impl RetrySchedule {
    pub fn new(cap: usize) -> RetrySchedule {
        RetrySchedule {
            entries: BTreeSet::new(),
            cap: cap.max(1),
            unheld_from: None,
        }
    }

    /// Adds a job that waits in `retry/` until `due_ms` (ms since the epoch).
    pub fn insert(&mut self, name: OsString, due_ms: u64) {
        if self.entries.len() < self.cap {
            self.entries.insert((due_ms, name));
            return;
        }
        let latest = self.entries.last().map_or(u64::MAX, |(due, _)| *due);
        let left_out = if due_ms < latest {
            self.entries.insert((due_ms, name));
            self.entries.pop_last().map_or(due_ms, |(due, _)| due)
        } else {
            due_ms
        };
        self.unheld_from = Some(self.unheld_from.map_or(left_out, |u| u.min(left_out)));
    }

    /// The earliest due time held, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.entries.first().map(|(due, _)| *due)
    }

    /// Takes the next entry due at or before `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<(OsString, u64)> {
        if self.next_due()? > now_ms {
            return None;
        }
        self.entries.pop_first().map(|(due, name)| (name, due))
    }

    /// True when a job left out of memory may be due before anything held: the directory must
    /// be read again to find it.
    pub fn needs_rescan(&self) -> bool {
        // Strictly later: when more jobs share one due time than the schedule holds, those
        // held are promoted first, and the directory is read again only once they are gone.
        // Reading it while they are due would find the same set and never promote any.
        self.unheld_from
            .is_some_and(|unheld| self.next_due().is_none_or(|held| held > unheld))
    }

    /// Starts over from a fresh read of the directory. Entries added since that read began are
    /// kept: the read may have missed their files.
    pub fn replace_with(&mut self, scanned: RetrySchedule) {
        self.unheld_from = scanned.unheld_from;
        for (due, name) in scanned.entries {
            self.insert(name, due);
        }
    }

    /// Forgets everything held; the caller is about to read the directory again.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.unheld_from = None;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: u64) -> OsString {
        OsString::from(format!("j{i}"))
    }

    #[test]
    fn due_entries_come_out_in_order_and_not_before_their_time() {
        let mut s = RetrySchedule::new(10);
        for due in [30, 10, 20] {
            s.insert(name(due), due);
        }
        assert_eq!(s.pop_due(5), None);
        assert_eq!(s.pop_due(25), Some((name(10), 10)));
        assert_eq!(s.pop_due(25), Some((name(20), 20)));
        assert_eq!(s.pop_due(25), None);
        assert_eq!(s.next_due(), Some(30));
        assert!(!s.needs_rescan());
    }

    #[test]
    fn a_full_schedule_keeps_the_earliest_and_asks_for_a_rescan_in_time() {
        let mut s = RetrySchedule::new(3);
        for due in [50, 40, 30, 20, 10] {
            s.insert(name(due), due);
        }
        // Held: 10, 20, 30. Left out: 40 and 50.
        assert_eq!(s.len(), 3);
        assert_eq!(s.next_due(), Some(10));
        assert!(!s.needs_rescan());
        assert_eq!(s.pop_due(100), Some((name(10), 10)));
        assert_eq!(s.pop_due(100), Some((name(20), 20)));
        assert!(
            !s.needs_rescan(),
            "30 is held and due before anything left out"
        );
        assert_eq!(s.pop_due(100), Some((name(30), 30)));
        assert!(
            s.needs_rescan(),
            "40 was left out and nothing held comes first"
        );

        // The rescan finds what is still in the directory.
        let mut scanned = RetrySchedule::new(3);
        scanned.insert(name(40), 40);
        scanned.insert(name(50), 50);
        s.clear();
        s.insert(name(45), 45); // scheduled while the directory was read
        s.replace_with(scanned);
        assert!(!s.needs_rescan());
        let order: Vec<u64> = std::iter::from_fn(|| s.pop_due(100).map(|(_, d)| d)).collect();
        assert_eq!(order, [40, 45, 50]);
    }

    /// More jobs due at one moment than the schedule holds (jobs put in retry/ without a
    /// record are all due at 0): the held ones are promoted before the directory is read again,
    /// and a model of the directory ends empty, each job promoted once.
    #[test]
    fn more_jobs_due_at_once_than_it_holds_are_all_promoted() {
        let mut dir: BTreeSet<(u64, OsString)> = (0..10).map(|i| (0, name(i))).collect();
        dir.extend((10..17).map(|i| (i, name(i))));
        let mut s = RetrySchedule::new(4);
        let mut promoted = Vec::new();
        let mut reads = 0;
        while !dir.is_empty() {
            assert!(
                reads < 20,
                "read the directory {reads} times, promoted {promoted:?}"
            );
            if s.is_empty() || s.needs_rescan() {
                reads += 1;
                let mut scanned = RetrySchedule::new(4);
                for (due, n) in &dir {
                    scanned.insert(n.clone(), *due);
                }
                s.clear();
                s.replace_with(scanned);
                assert!(!s.needs_rescan(), "a fresh read must be acted on first");
            }
            while let Some((n, due)) = s.pop_due(100) {
                assert!(dir.remove(&(due, n.clone())), "{n:?} promoted twice");
                promoted.push(n);
                if s.needs_rescan() {
                    break;
                }
            }
        }
        assert_eq!(promoted.len(), 17);
        assert!(reads <= 6, "{reads} reads for 17 jobs held 4 at a time");
    }

    #[test]
    fn a_later_entry_than_everything_held_is_left_out_not_lost() {
        let mut s = RetrySchedule::new(2);
        s.insert(name(1), 1);
        s.insert(name(2), 2);
        s.insert(name(99), 99);
        assert_eq!(s.len(), 2);
        s.pop_due(10);
        assert!(!s.needs_rescan());
        s.pop_due(10);
        assert!(s.needs_rescan(), "the entry due at 99 must be found again");
    }
}
