//! Detecting another writer that keeps reverting our configuration (Cilium with `cni.exclusive=true`, a second
//! installer with other settings) and rate-limiting our rewrites instead of rewriting the shared file in a tight
//! loop. The delay is bounded (`MIN_INTERVAL` after our last rewrite, never more): new pods must not start without
//! our plugin for long, and once the writer stops the next revert is undone at once. Pure: time is passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Rewrites within `WINDOW` that mean a fight.
pub const THRESHOLD: usize = 10;
/// The sliding window over which rewrites are counted.
pub const WINDOW: Duration = Duration::from_secs(2);
/// While fighting, at least this long between two of our rewrites (at most 4 a second). A revert that comes later
/// than this after our last rewrite is undone immediately.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// No rewrite for this long ends the fight.
pub const QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct FightDetector {
    writes: VecDeque<Instant>,
    fighting: bool,
}

impl FightDetector {
    fn expire(&mut self, now: Instant) {
        if self
            .writes
            .back()
            .is_some_and(|&last| now.saturating_duration_since(last) > QUIET)
        {
            self.fighting = false;
        }
    }

    /// May we rewrite now? `Err(until)` while fighting and our last rewrite is less than `MIN_INTERVAL` old.
    pub fn allowed(&self, now: Instant) -> Result<(), Instant> {
        match self.writes.back() {
            Some(&last) if self.fighting && now < last + MIN_INTERVAL => Err(last + MIN_INTERVAL),
            _ => Ok(()),
        }
    }

    /// Records a rewrite; returns true when this rewrite starts a fight.
    pub fn record(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.writes.push_back(now);
        while self
            .writes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > WINDOW)
        {
            self.writes.pop_front();
        }
        if !self.fighting && self.writes.len() >= THRESHOLD {
            self.fighting = true;
            return true;
        }
        false
    }

    /// `Some(end)` while fighting: the fight is over at `end` unless we rewrite again before.
    pub fn fighting(&self, now: Instant) -> Option<Instant> {
        let end = *self.writes.back()? + QUIET;
        (self.fighting && now <= end).then_some(end)
    }

    /// Rewrites counted in the current window.
    pub fn recent(&self) -> usize {
        self.writes.len()
    }
}

/// The warning's hint for a known fighter, from the file's name.
pub fn hint(path: &str) -> &'static str {
    if path.contains("cilium") {
        " Hint: Cilium CNI was detected; ensure 'cni.exclusive=false' in the Cilium configuration."
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occasional_rewrites_are_not_a_fight() {
        let t0 = Instant::now();
        let mut f = FightDetector::default();
        // One rewrite every 250 ms for 30 rewrites: never THRESHOLD within WINDOW.
        for i in 0..30 {
            let now = t0 + Duration::from_millis(250 * i);
            assert!(f.allowed(now).is_ok());
            assert!(!f.record(now), "rewrite {i}");
            assert_eq!(f.fighting(now), None);
        }
    }

    #[test]
    fn tight_loop_is_rate_limited_with_a_bounded_delay_then_recovers() {
        let t0 = Instant::now();
        let mut f = FightDetector::default();
        let mut now = t0;
        for _ in 0..THRESHOLD - 1 {
            assert!(!f.record(now));
            now += Duration::from_millis(5);
        }
        assert!(f.record(now), "the tenth rewrite in 2 s starts the fight");
        assert_eq!(f.fighting(now), Some(now + QUIET));
        assert_eq!(
            f.allowed(now + Duration::from_millis(50)),
            Err(now + MIN_INTERVAL)
        );
        // A reverter as fast as can be for 10 s: we rewrite every MIN_INTERVAL, never later, and the fight holds.
        let mut rewrites = 0;
        let end = now + Duration::from_secs(10);
        while now < end {
            now += Duration::from_millis(1);
            match f.allowed(now) {
                Ok(()) => {
                    assert!(!f.record(now), "one warning per fight");
                    rewrites += 1;
                }
                Err(until) => {
                    assert!(until - now <= MIN_INTERVAL && MIN_INTERVAL < Duration::from_secs(1))
                }
            }
            assert!(f.fighting(now).is_some());
        }
        assert!((39..=41).contains(&rewrites), "{rewrites} rewrites in 10 s");
        // The writer stops; a revert later than MIN_INTERVAL after our last rewrite is undone at once.
        now += MIN_INTERVAL;
        assert!(f.allowed(now).is_ok());
        assert!(!f.record(now));
        // Quiet for long enough: the fight is over, and a new one needs THRESHOLD rewrites again.
        now += QUIET + Duration::from_millis(1);
        assert_eq!(f.fighting(now), None);
        assert!(f.allowed(now).is_ok());
        assert!(!f.record(now));
        assert!(f.allowed(now + Duration::from_millis(1)).is_ok());
    }

    #[test]
    fn cilium_hint() {
        assert!(hint("/host/etc/cni/net.d/05-cilium.conflist").contains("cni.exclusive"));
        assert_eq!(hint("/etc/cni/net.d/10-calico.conflist"), "");
    }
}
