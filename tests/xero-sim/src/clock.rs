//! The simulator's clock: real time shifted by an offset and scaled by a
//! speed factor, so tests can expire tokens, codes, idempotency keys and
//! rate-limit windows without sleeping.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use parking_lot::Mutex;
use std::time::Instant;

#[derive(Debug)]
struct ClockState {
    /// Real instant at which `base_sim` was the simulated time.
    base_real: Instant,
    /// Simulated time at `base_real`.
    base_sim: DateTime<Utc>,
    /// How many simulated seconds pass per real second.
    speed: f64,
}

/// A clock that tests can move forward or speed up.
///
/// `now() = base_sim + (real elapsed since base_real) * speed`.
#[derive(Debug)]
pub struct SimClock {
    state: Mutex<ClockState>,
}

impl SimClock {
    /// A clock starting at `start` (or the real current time) running at `speed`.
    pub fn new(start: Option<DateTime<Utc>>, speed: f64) -> Self {
        SimClock {
            state: Mutex::new(ClockState {
                base_real: Instant::now(),
                base_sim: start.unwrap_or_else(Utc::now),
                speed: sanitize_speed(speed),
            }),
        }
    }

    /// The current simulated time.
    pub fn now(&self) -> DateTime<Utc> {
        let s = self.state.lock();
        Self::now_locked(&s)
    }

    fn now_locked(s: &ClockState) -> DateTime<Utc> {
        let real = s.base_real.elapsed();
        let scaled_ms = (real.as_secs_f64() * s.speed * 1000.0) as i64;
        ChronoDuration::try_milliseconds(scaled_ms)
            .and_then(|d| s.base_sim.checked_add_signed(d))
            .unwrap_or(s.base_sim)
    }

    /// Move the simulated time forward (or backward, if negative) by `secs` seconds.
    pub fn advance_secs(&self, secs: i64) {
        let mut s = self.state.lock();
        let now = Self::now_locked(&s);
        s.base_real = Instant::now();
        s.base_sim = ChronoDuration::try_seconds(secs)
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(now);
    }

    /// Set the simulated time to `at`.
    pub fn set(&self, at: DateTime<Utc>) {
        let mut s = self.state.lock();
        s.base_real = Instant::now();
        s.base_sim = at;
    }

    /// Change the speed factor (1.0 = real time, 60.0 = a minute per second, 0 = frozen).
    pub fn set_speed(&self, speed: f64) {
        let mut s = self.state.lock();
        let now = Self::now_locked(&s);
        s.base_real = Instant::now();
        s.base_sim = now;
        s.speed = sanitize_speed(speed);
    }

    /// The current speed factor.
    pub fn speed(&self) -> f64 {
        self.state.lock().speed
    }
}

/// `t + secs`, saturating instead of panicking at the ends of the calendar.
pub(crate) fn add_secs(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    ChronoDuration::try_seconds(secs)
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(if secs >= 0 {
            DateTime::<Utc>::MAX_UTC
        } else {
            DateTime::<Utc>::MIN_UTC
        })
}

fn sanitize_speed(speed: f64) -> f64 {
    if speed.is_finite() && speed >= 0.0 {
        speed
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_and_freeze() {
        let c = SimClock::new(None, 0.0);
        let t0 = c.now();
        c.advance_secs(90);
        assert_eq!((c.now() - t0).num_seconds(), 90);
        c.set_speed(-3.0);
        assert_eq!(c.speed(), 1.0);
    }
}
