//! Detecting another writer that keeps reverting our configuration (Cilium with `cni.exclusive=true`, a second
//! installer with other settings) and backing off exponentially instead of rewriting the shared file in a tight
//! loop. Pure: time is passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Rewrites within `WINDOW` that mean a fight.
pub const THRESHOLD: usize = 10;
/// The sliding window over which rewrites are counted.
pub const WINDOW: Duration = Duration::from_secs(2);
/// First delay once fighting; it doubles on every further rewrite, up to `MAX_DELAY`.
pub const BASE_DELAY: Duration = Duration::from_millis(100);
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// No rewrite for this long (plus the current delay) ends the fight.
pub const QUIET: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct FightDetector {
    writes: VecDeque<Instant>,
    delay: Option<Duration>,
    not_before: Option<Instant>,
}

impl FightDetector {
    /// May we rewrite now? `Err(until)` while backing off.
    pub fn allowed(&self, now: Instant) -> Result<(), Instant> {
        match self.not_before {
            Some(t) if now < t => Err(t),
            _ => Ok(()),
        }
    }

    /// Records a rewrite; returns the new delay when this rewrite starts or extends a back-off.
    pub fn record(&mut self, now: Instant) -> Option<Duration> {
        if let (Some(delay), Some(&last)) = (self.delay, self.writes.back()) {
            if now.saturating_duration_since(last) > QUIET + delay {
                self.delay = None;
                self.writes.clear();
            }
        }
        self.writes.push_back(now);
        while self
            .writes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > WINDOW)
        {
            self.writes.pop_front();
        }
        let next = match self.delay {
            Some(d) => Some((d * 2).min(MAX_DELAY)),
            None if self.writes.len() >= THRESHOLD => Some(BASE_DELAY),
            None => None,
        };
        if let Some(d) = next {
            self.delay = Some(d);
            self.not_before = Some(now + d);
        }
        next
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
            assert_eq!(f.record(now), None, "rewrite {i}");
        }
    }

    #[test]
    fn tight_loop_backs_off_exponentially_then_recovers() {
        let t0 = Instant::now();
        let mut f = FightDetector::default();
        let mut now = t0;
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(f.record(now), None);
            now += Duration::from_millis(5);
        }
        assert_eq!(f.record(now), Some(BASE_DELAY));
        assert_eq!(
            f.allowed(now + Duration::from_millis(50)),
            Err(now + BASE_DELAY)
        );
        now += BASE_DELAY;
        assert!(f.allowed(now).is_ok());
        assert_eq!(f.record(now), Some(BASE_DELAY * 2));
        let mut delay = BASE_DELAY * 2;
        for _ in 0..20 {
            now += delay;
            delay = f.record(now).unwrap();
        }
        assert_eq!(delay, MAX_DELAY);
        // Quiet for long enough: the next rewrite is not delayed.
        now += QUIET + MAX_DELAY + Duration::from_secs(1);
        assert!(f.allowed(now).is_ok());
        assert_eq!(f.record(now), None);
        assert_eq!(f.recent(), 1);
    }

    #[test]
    fn cilium_hint() {
        assert!(hint("/host/etc/cni/net.d/05-cilium.conflist").contains("cni.exclusive"));
        assert_eq!(hint("/etc/cni/net.d/10-calico.conflist"), "");
    }
}
