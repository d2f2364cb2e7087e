//! Which waiting issue starts next, at O(log n) per change: a ready queue
//! in the order issues became ready, and an index of retry deadlines. The
//! loop looks at the earliest deadline only, and only while a slot is
//! free, so a backlog of thousands costs nothing while nothing can start.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use crate::issue::IssueKey;

/// How a waiting issue waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Ready to start, in the order of this time (when it became ready).
    Ready(SystemTime),
    /// A retry, not before this time.
    Due(SystemTime),
}

#[derive(Debug, Default)]
pub(super) struct Schedule {
    ready: BTreeSet<(SystemTime, IssueKey)>,
    due: BTreeSet<(SystemTime, IssueKey)>,
    waits: HashMap<IssueKey, Wait>,
}

impl Schedule {
    /// Sets how `key` waits; `None` takes it out (running or settled).
    pub(super) fn set(&mut self, key: &IssueKey, wait: Option<Wait>) {
        if self.waits.get(key) == wait.as_ref() {
            return;
        }
        match self.waits.remove(key) {
            Some(Wait::Ready(t)) => {
                self.ready.remove(&(t, key.clone()));
            }
            Some(Wait::Due(t)) => {
                self.due.remove(&(t, key.clone()));
            }
            None => {}
        }
        match wait {
            Some(Wait::Ready(t)) => {
                self.ready.insert((t, key.clone()));
            }
            Some(Wait::Due(t)) => {
                self.due.insert((t, key.clone()));
            }
            None => return,
        }
        if let Some(wait) = wait {
            self.waits.insert(key.clone(), wait);
        }
    }

    /// Moves every retry due at `now` to the ready queue, in deadline order.
    pub(super) fn promote_due(&mut self, now: SystemTime) {
        while let Some((t, key)) = self.due.first().cloned() {
            if t > now {
                break;
            }
            self.set(&key, Some(Wait::Ready(t)));
        }
    }

    /// Takes the issue that has been ready longest.
    pub(super) fn pop_ready(&mut self) -> Option<IssueKey> {
        let (_, key) = self.ready.pop_first()?;
        self.waits.remove(&key);
        Some(key)
    }

    /// The earliest retry deadline.
    pub(super) fn next_due(&self) -> Option<SystemTime> {
        self.due.first().map(|(t, _)| *t)
    }

    /// Every waiting issue (for the check after a poll).
    pub(super) fn keys(&self) -> impl Iterator<Item = &IssueKey> {
        self.waits.keys()
    }

    /// Issues ready to start now.
    pub(super) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    pub(super) fn len(&self) -> usize {
        self.waits.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(n: u64) -> IssueKey {
        IssueKey::new("o/r".parse().unwrap(), n)
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn ready_issues_start_in_order_and_retries_join_when_due() {
        let mut s = Schedule::default();
        s.set(&key(1), Some(Wait::Ready(at(5))));
        s.set(&key(2), Some(Wait::Ready(at(3))));
        s.set(&key(3), Some(Wait::Due(at(10))));
        s.set(&key(4), Some(Wait::Due(at(4))));
        assert_eq!(s.next_due(), Some(at(4)));
        s.promote_due(at(6));
        assert_eq!(s.len(), 4);
        let order: Vec<_> = std::iter::from_fn(|| s.pop_ready()).collect();
        assert_eq!(order, [key(2), key(4), key(1)]);
        assert_eq!(s.next_due(), Some(at(10)));
        s.set(&key(3), None);
        assert_eq!((s.next_due(), s.len()), (None, 0));
    }

    #[test]
    fn setting_a_new_wait_replaces_the_old_one() {
        let mut s = Schedule::default();
        s.set(&key(1), Some(Wait::Due(at(10))));
        s.set(&key(1), Some(Wait::Ready(at(1))));
        assert_eq!(s.next_due(), None);
        assert_eq!(s.pop_ready(), Some(key(1)));
        assert_eq!(s.pop_ready(), None);
        assert_eq!(s.keys().count(), 0);
    }
}
