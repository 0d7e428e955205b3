//! A volume's event counter (`dmsetup wait`): raised by the control plane and by targets on
//! state changes (a path failed, a merge finished), read by waiters. Any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Event counter of a volume (`dmsetup wait`); targets raise it on state changes.
#[derive(Debug, Default)]
pub struct Events {
    nr: AtomicU64,
}

impl Events {
    pub fn raise(&self) {
        self.nr.fetch_add(1, Ordering::Release);
    }

    pub fn nr(&self) -> u64 {
        self.nr.load(Ordering::Acquire)
    }
}
