//! A file leaf's health: its backing file checked with `fstat` (deleted: no links left;
//! truncated: shorter than the leaf) each time the control plane asks (the daemon asks every
//! few seconds: that is the slow timer), and the I/O errors its channels saw.
//!
//! Channels (reactor threads) only record an I/O error when one completes: one relaxed atomic
//! store and add, no lock, nothing allocated, nothing per successful I/O. The rest runs in
//! [`FileHealth::get`], on the control plane.

use super::{blk_size_bytes, Shared};
use stackbd_core::{HealthState, LeafHealth};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A leaf whose last I/O error is younger than this is `degraded`.
pub(super) const RECENT: Duration = Duration::from_secs(30);

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct FileHealth {
    /// I/O errors completed by the channels.
    io_errors: AtomicU64,
    /// The last one: milliseconds since the epoch << 16 | errno (0: none).
    last_io_error: AtomicU64,
    /// What the control plane reported last: its state, since when, and the last error.
    /// Only the control plane takes this lock.
    seen: Mutex<Option<Seen>>,
}

#[derive(Debug, Clone)]
struct Seen {
    state: HealthState,
    since: SystemTime,
    error: Option<(String, SystemTime)>,
}

impl FileHealth {
    /// A channel completed an I/O with `errno` (not `EAGAIN` or an unsupported operation).
    /// Reactor thread: no lock, no allocation.
    pub(super) fn io_error(&self, errno: i32) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_io_error.store(
            (ms << 16) | u64::from(errno.clamp(1, 0xffff) as u16),
            Ordering::Relaxed,
        );
        self.io_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// I/O errors seen so far.
    pub(super) fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }

    /// The leaf's health (control plane, any thread; one `fstat`, or a size ioctl on a block
    /// device): `failed` when the backing file was deleted or truncated below the leaf (or
    /// cannot be looked at), `degraded` after an I/O error in the last [`RECENT`], else `ok`.
    pub(super) fn get(&self, sh: &Shared) -> LeafHealth {
        let now = SystemTime::now();
        let (state, problem) = match backing_problem(sh) {
            Some(p) => (HealthState::Failed, Some(p)),
            None => match self.last_io() {
                Some((errno, at)) if now.duration_since(at).unwrap_or_default() < RECENT => {
                    let n = self.io_errors();
                    let text = format!(
                        "I/O error: {} ({n} so far)",
                        io::Error::from_raw_os_error(errno)
                    );
                    (HealthState::Degraded, Some(text))
                }
                _ => (HealthState::Ok, None),
            },
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let prev = seen.take();
        let since = match &prev {
            Some(p) if p.state == state => p.since,
            _ => now,
        };
        // The last error: the problem now (dated when first seen), else the last I/O error,
        // else whatever was seen before.
        let error = match problem {
            Some(text) => match prev.as_ref().and_then(|p| p.error.clone()) {
                Some((old, at)) if old == text => Some((old, at)),
                _ => Some((text, now)),
            },
            None => {
                let io = self.last_io().map(|(errno, at)| {
                    let e = io::Error::from_raw_os_error(errno);
                    (format!("I/O error: {e}"), at)
                });
                let before = prev.as_ref().and_then(|p| p.error.clone());
                match (io, before) {
                    (Some(a), Some(b)) => Some(if a.1 >= b.1 { a } else { b }),
                    (a, b) => a.or(b),
                }
            }
        };
        *seen = Some(Seen {
            state,
            since,
            error: error.clone(),
        });
        LeafHealth {
            state,
            since: Some(since),
            last_error: error,
        }
    }

    fn last_io(&self) -> Option<(i32, SystemTime)> {
        let v = self.last_io_error.load(Ordering::Relaxed);
        (v != 0).then(|| {
            (
                (v & 0xffff) as i32,
                UNIX_EPOCH + Duration::from_millis(v >> 16),
            )
        })
    }
}

/// What is wrong with the backing file, if anything: deleted, truncated, or not there to look
/// at.
fn backing_problem(sh: &Shared) -> Option<String> {
    let md = match sh.file.metadata() {
        Ok(md) => md,
        Err(e) => return Some(format!("cannot stat the backing file: {e}")),
    };
    let (len, what) = if sh.blockdev {
        match blk_size_bytes(&sh.file) {
            Ok(n) => (n, "device"),
            Err(e) => return Some(format!("cannot size the backing device: {e}")),
        }
    } else {
        if md.nlink() == 0 {
            return Some("backing file deleted".into());
        }
        (md.len(), "file")
    };
    (len < sh.size_bytes).then(|| {
        format!(
            "backing {what} truncated to {len} bytes (leaf is {})",
            sh.size_bytes
        )
    })
}
