//! Letting suspended volumes go at shutdown: held I/O goes on through the live table, and an
//! inactive table stays where it is (a shutdown swaps no tables).

use super::{DevEntry, Engine, EngineError};

impl Engine {
    /// Names of the suspended volumes, and of those whose suspend is draining.
    pub fn suspended_volumes(&self) -> Vec<String> {
        self.devs
            .iter()
            .filter_map(|d| match d {
                DevEntry::Volume(v) if v.suspended.is_some() || v.suspending.is_some() => {
                    Some(v.name.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Resumes a suspended volume on its live table without swapping in the inactive one:
    /// held I/O goes on (through the live table, or fails if there is none). A suspend still
    /// draining is cancelled the same way. False if the volume was neither.
    pub fn release(&mut self, name: &str) -> Result<bool, EngineError> {
        let (id, v) = self.volume(name)?;
        if v.suspending.is_some() {
            tracing::info!(volume = %name, "pending suspend cancelled (released)");
            return Ok(self.cancel_suspend(id));
        }
        if v.suspended.is_none() {
            return Ok(false);
        }
        let v = self.volume_mut(id);
        if let Some(t) = &v.active {
            t.entries().iter().for_each(|e| e.target.resume());
        }
        v.suspended = None;
        self.suspended_count -= 1;
        self.reactors.each(move |r| r.resume(id));
        Ok(true)
    }
}
