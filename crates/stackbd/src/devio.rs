//! Synchronous reads of a device from a control thread, on an engine of either kind: the inline
//! reactor runs the I/O on the caller's thread; with reactor threads a one-shot frontend does it
//! on a reactor and hands the bytes back. For control-plane reads (a LUKS header), never the
//! data path: it allocates and blocks.

use stackbd_core::runtime::{Frontend, FrontendCx};
use stackbd_core::{Completion, DataBuf, DevId, Engine, Op, Request, Status, SECTOR_SIZE};
use std::sync::mpsc;
use std::time::Duration;

/// How long a control-plane read may take before it is given up.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads `buf.len()` bytes (whole sectors) at `sector` of `dev`. Blocks.
pub fn read_sectors(engine: &mut Engine, dev: DevId, sector: u64, buf: &mut [u8]) -> Status {
    debug_assert!(buf.len().is_multiple_of(SECTOR_SIZE));
    let Some(t) = engine.threads() else {
        return engine.read_at(dev, sector, buf);
    };
    let attacher = t.attacher();
    let mut mem = vec![0u8; buf.len()].into_boxed_slice();
    // SAFETY: `mem` is owned by the frontend until the read completes (it hands it back only
    // from `complete`), and nothing else touches it meanwhile.
    let data = unsafe { DataBuf::from_slice(&mut mem) };
    let req = Request::new(
        Op::Read,
        dev,
        sector,
        (buf.len() / SECTOR_SIZE) as u32,
        data,
        0,
    );
    let (tx, rx) = mpsc::channel();
    attacher.attach(
        Box::new(OneRead {
            req: Some(req),
            mem: Some(mem),
            tx,
            done: false,
        }),
        None,
    );
    match rx.recv_timeout(READ_TIMEOUT) {
        Ok((st, mem)) => {
            if st.is_ok() {
                buf.copy_from_slice(&mem);
            }
            st
        }
        Err(_) => Status::IoError,
    }
}

/// One read on a reactor; the result goes back through `tx`.
struct OneRead {
    req: Option<Request>,
    mem: Option<Box<[u8]>>,
    tx: mpsc::Sender<(Status, Box<[u8]>)>,
    done: bool,
}

impl Frontend for OneRead {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        let Some(r) = self.req.take() else {
            return 0;
        };
        match cx.submit(&r) {
            Ok(()) => 1,
            Err(Status::Again) => {
                self.req = Some(r);
                0
            }
            Err(s) => {
                self.done = true;
                let _ = self.tx.send((s, self.mem.take().unwrap_or_default()));
                1
            }
        }
    }

    fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
        self.done = true;
        let _ = self
            .tx
            .send((c.status, self.mem.take().unwrap_or_default()));
    }

    fn finished(&self) -> bool {
        self.done
    }
}
