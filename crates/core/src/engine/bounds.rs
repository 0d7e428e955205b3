//! Bounds on what a request may ask of the engine: durations that an `Instant` can hold, so
//! nothing that comes from a table, a config, a request or the wire can make the engine panic
//! (with its lock held) on an overflowing addition.

use super::{EngineError, SuspendOpts};
use std::time::{Duration, Instant};

/// The longest suspend deadline accepted: 30 days. A longer one is refused (ask for no
/// deadline instead, and resume by hand).
pub const MAX_SUSPEND_DEADLINE: Duration = Duration::from_secs(30 * 86_400);

/// The longest a suspend may wait for in-flight I/O to drain: one hour.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3_600);

/// `now + d`, or a clear error naming `what` when it does not fit.
pub fn instant_after(
    name: &str,
    what: &str,
    now: Instant,
    d: Duration,
) -> Result<Instant, EngineError> {
    now.checked_add(d)
        .ok_or_else(|| EngineError::invalid(name, format!("{what} {d:?} is too far in the future")))
}

impl SuspendOpts {
    /// Refuses a deadline or a drain timeout out of range, before anything changes.
    pub fn check(&self, name: &str) -> Result<(), EngineError> {
        if let Some(d) = self.deadline {
            if d.is_zero() || d > MAX_SUSPEND_DEADLINE {
                return Err(EngineError::invalid(
                    name,
                    format!(
                        "suspend deadline {:.3} s is out of range: more than 0 and at most {} s \
                         (30 days); suspend with no deadline to wait for resume forever",
                        d.as_secs_f64(),
                        MAX_SUSPEND_DEADLINE.as_secs()
                    ),
                ));
            }
        }
        if self.drain_timeout > MAX_DRAIN_TIMEOUT {
            return Err(EngineError::invalid(
                name,
                format!(
                    "suspend drain timeout {:.3} s is out of range: at most {} s",
                    self.drain_timeout.as_secs_f64(),
                    MAX_DRAIN_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(())
    }
}
