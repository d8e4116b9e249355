//! The rise/fall state machine of one endpoint. Pure: no time, no I/O.

use serde::{Deserialize, Serialize};

/// What we believe about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// No probe has finished yet. Never answered as fit.
    Unknown,
    Up,
    Down,
}

/// Consecutive-result hysteresis: `rise` successes to come up, `fall`
/// failures to go down. The very first result decides at once, so the first
/// answer after start reflects a real probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub status: Status,
    /// Consecutive results that disagree with `status`.
    streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            status: Status::Unknown,
            streak: 0,
        }
    }
}

impl HealthState {
    /// Feeds one probe result; returns the new status if it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Status> {
        let wanted = if ok { Status::Up } else { Status::Down };
        if self.status == Status::Unknown {
            self.status = wanted;
            self.streak = 0;
            return Some(wanted);
        }
        if self.status == wanted {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed.max(1) {
            self.status = wanted;
            self.streak = 0;
            Some(wanted)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_at_once() {
        let mut up = HealthState::default();
        assert_eq!(up.observe(true, 3, 3), Some(Status::Up));
        let mut down = HealthState::default();
        assert_eq!(down.observe(false, 3, 3), Some(Status::Down));
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut s = HealthState::default();
        s.observe(true, 2, 3);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        // One success in between resets the count: a lost probe never flips.
        assert_eq!(s.observe(true, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), Some(Status::Down));
        assert_eq!(s.status, Status::Down);
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let mut s = HealthState::default();
        s.observe(false, 2, 2);
        assert_eq!(s.observe(true, 2, 2), None);
        assert_eq!(s.observe(false, 2, 2), None);
        assert_eq!(s.observe(true, 2, 2), None);
        assert_eq!(s.observe(true, 2, 2), Some(Status::Up));
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_each_result() {
        let mut s = HealthState::default();
        s.observe(true, 1, 1);
        assert_eq!(s.observe(false, 1, 1), Some(Status::Down));
        assert_eq!(s.observe(true, 1, 1), Some(Status::Up));
    }
}
