//! `null`: reads return zeros, writes are dropped, everything completes at once. The floor for
//! measuring the cost of the stack itself.

use stackbd_core::{BioId, Leaf, LeafChannel, LeafCx, Limits, Op, Sector, Status, SECTOR_SIZE};

#[derive(Debug, Clone)]
pub struct NullLeaf {
    size_bytes: u64,
}

impl NullLeaf {
    pub fn new(size_bytes: u64) -> NullLeaf {
        NullLeaf {
            size_bytes: size_bytes / SECTOR_SIZE as u64 * SECTOR_SIZE as u64,
        }
    }
}

impl Leaf for NullLeaf {
    fn kind(&self) -> &'static str {
        "null"
    }

    fn size(&self) -> Sector {
        self.size_bytes / SECTOR_SIZE as u64
    }

    fn limits(&self) -> Limits {
        Limits {
            max_copy_sectors: 0,
            copy_native: false,
            ..Limits::TOP
        }
    }

    fn args(&self) -> String {
        format!("{}", self.size_bytes)
    }

    fn channel(&self) -> Box<dyn LeafChannel> {
        Box::new(NullChannel)
    }
}

struct NullChannel;

impl LeafChannel for NullChannel {
    #[inline]
    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        let bio = cx.bio(id);
        let status = match bio.op {
            Op::Read => {
                bio.data.fill_zero();
                Status::Ok
            }
            _ => Status::Ok,
        };
        cx.complete(id, status);
    }
}
