//! The last probes the engine ran, whoever asked for them, for the `/test/` page's charts.
//!
//! A bounded ring ([`settings::PROBE_HISTORY`](crate::settings::PROBE_HISTORY)): recording
//! a probe is one clone and one push under a mutex, so a probe costs no more than before;
//! the statistics and the drawing happen when a page asks for a snapshot.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use super::ProbeResult;

/// The most recent probes, oldest first, at most `capacity` of them (0 keeps none).
#[derive(Debug)]
pub struct ProbeHistory {
    capacity: usize,
    // Shared, so that a page's snapshot copies pointers, not results.
    probes: Mutex<VecDeque<Arc<ProbeResult>>>,
}

impl ProbeHistory {
    pub fn new(capacity: usize) -> Self {
        ProbeHistory {
            capacity,
            probes: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps `probe`, forgetting the oldest one when full.
    pub fn record(&self, probe: &ProbeResult) {
        if self.capacity == 0 {
            return;
        }
        // Cloned before the lock so that concurrent probes wait only for the push.
        let probe = Arc::new(probe.clone());
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if probes.len() == self.capacity {
            probes.pop_front();
        }
        probes.push_back(probe);
    }

    /// The probes kept, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<ProbeResult>> {
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::probe_with_token;

    #[test]
    fn keeps_the_newest_up_to_its_capacity() {
        let history = ProbeHistory::new(3);
        for token in ["a", "b", "c", "d"] {
            history.record(&probe_with_token(token));
        }
        let snapshot = history.snapshot();
        let tokens: Vec<_> = snapshot.iter().map(|p| p.token.as_str()).collect();
        assert_eq!(tokens, ["b", "c", "d"]);
        let none = ProbeHistory::new(0);
        none.record(&probe_with_token("a"));
        assert!(none.snapshot().is_empty());
    }
}
