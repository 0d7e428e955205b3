//! What the daemon could not bring up at start (a leaf whose file is gone, an NBD server that
//! does not answer, a LUKS key file that is missing, a volume over any of them, an export of
//! such a volume), kept so that nothing is lost: the state file still holds it, `leaf ls`, `ls`
//! and `info` show it with why, and it is tried again — every [`RETRY_EVERY`], on `leaf retry`,
//! and whenever a leaf is added (which may be what it waited for).
//!
//! Runs on control threads. Leaves are opened outside the engine lock (opening may block);
//! volumes, LUKS volumes and exports are brought up under it. Lock order: `engine`,
//! `leaf_params`, `luks`, then `pending`.

use super::Daemon;
use crate::config::{ExportDecl, Failed};
use stackbd_core::Engine;
use std::sync::PoisonError;
use std::time::Duration;

/// How often the daemon retries what failed, by itself.
pub const RETRY_EVERY: Duration = Duration::from_secs(15);

impl Daemon {
    pub(crate) fn pending(&self) -> std::sync::MutexGuard<'_, Failed> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tries the failed leaves again (only `only`, if given), then everything that waits on a
    /// device. Returns the names that came up. Blocks while leaves open.
    pub fn retry_pending(&self, only: Option<&str>) -> Vec<String> {
        let leaves: Vec<_> = self
            .pending()
            .leaves
            .iter()
            .filter(|(l, _)| only.is_none_or(|n| n == l.name))
            .map(|(l, _)| l.clone())
            .collect();
        let mut up = Vec::new();
        for l in leaves {
            // Outside every lock: opening a file or connecting may block.
            let built = l.params.build();
            let mut e = super::lock_engine(self);
            let r = built
                .map_err(|err| crate::config::leaf_build_error(&l.params, &err))
                .and_then(|leaf| e.add_leaf(&l.name, leaf).map_err(|x| x.to_string()));
            let mut p = self.pending();
            let Some(i) = p.leaves.iter().position(|(x, _)| x.name == l.name) else {
                // Replaced or removed meanwhile: not ours to add.
                if r.is_ok() {
                    let _ = e.remove_leaf(&l.name);
                }
                continue;
            };
            match r {
                Ok(_) => {
                    p.leaves.remove(i);
                    drop(p);
                    self.leaf_params
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(l.name.clone(), l.params.clone());
                    tracing::info!(leaf = %l.name, "leaf that had failed is up");
                    up.push(l.name.clone());
                }
                Err(why) => p.leaves[i].1 = why,
            }
        }
        let mut e = super::lock_engine(self);
        up.extend(self.bring_up_dependents(&mut e));
        if !up.is_empty() {
            self.refresh_exports(&e);
            self.save(&e);
        }
        up
    }

    /// Brings up the LUKS volumes, volumes and exports that wait, in as many passes as they
    /// need (a volume over a volume comes up in the pass after it). Engine lock held.
    pub(crate) fn bring_up_dependents(&self, e: &mut Engine) -> Vec<String> {
        let mut up = Vec::new();
        loop {
            let before = up.len();
            self.luks_pass(e, &mut up);
            self.volume_pass(e, &mut up);
            self.export_pass(e, &mut up);
            if up.len() == before {
                return up;
            }
        }
    }

    fn luks_pass(&self, e: &mut Engine, up: &mut Vec<String>) {
        let todo: Vec<_> = self.pending().luks.iter().map(|(l, _)| l.clone()).collect();
        for l in todo {
            if e.dev_id(&l.device).is_err() {
                continue;
            }
            let r = l.open(e);
            let mut p = self.pending();
            let Some(i) = p.luks.iter().position(|(x, _)| x.name == l.name) else {
                continue;
            };
            match r {
                Ok(()) => {
                    p.luks.remove(i);
                    drop(p);
                    self.luks
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(l.name.clone(), l.clone());
                    tracing::info!(volume = %l.name, "LUKS volume that had failed is up");
                    up.push(l.name);
                }
                Err(why) => p.luks[i].1 = why,
            }
        }
    }

    fn volume_pass(&self, e: &mut Engine, up: &mut Vec<String>) {
        let todo: Vec<_> = self
            .pending()
            .volumes
            .iter()
            .map(|(v, _)| v.clone())
            .collect();
        for v in todo {
            let r = e
                .create(&v.name, Some(&v.table))
                .and_then(|_| e.set_queue(&v.name, v.queue));
            let mut p = self.pending();
            let Some(i) = p.volumes.iter().position(|(x, _)| x.name == v.name) else {
                continue;
            };
            match r {
                Ok(()) => {
                    p.volumes.remove(i);
                    tracing::info!(volume = %v.name, "volume that had failed is up");
                    up.push(v.name);
                }
                Err(why) => {
                    // A half-made volume (created, queue refused) must not stay.
                    if !matches!(why, stackbd_core::EngineError::Exists(_)) {
                        let _ = e.remove(&v.name, false);
                    }
                    p.volumes[i].1 = why.to_string();
                }
            }
        }
    }

    fn export_pass(&self, e: &mut Engine, up: &mut Vec<String>) {
        let todo: Vec<ExportDecl> = self
            .pending()
            .exports
            .iter()
            .map(|(x, _)| x.clone())
            .collect();
        for x in todo {
            if e.info(&x.volume).is_err() {
                continue;
            }
            let r = self.add_export(e, &x.name, &x.volume, x.read_only);
            let mut p = self.pending();
            let Some(i) = p.exports.iter().position(|(y, _)| y.name == x.name) else {
                continue;
            };
            match r {
                Ok(()) => {
                    p.exports.remove(i);
                    tracing::info!(export = %x.name, "export that had failed is up");
                    up.push(x.name);
                }
                Err(why) => p.exports[i].1 = why,
            }
        }
    }
}
