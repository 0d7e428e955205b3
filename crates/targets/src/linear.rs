//! `linear <device> <offset>`: maps the target's range onto a device at an offset.
//! A pure remap: it pushes no frame and costs an add.

use stackbd_core::target::{expect_args, parse_num, TargetExtent};
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, DevRef, Limits, MapResult, Sector, Target, TargetCx,
};

#[derive(Debug)]
pub struct Linear {
    dev: DevRef,
    offset: Sector,
    start: Sector,
}

impl Linear {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(args, 2, "<device> <offset>")?;
        let offset = parse_num::<Sector>("offset", args[1])?;
        let (dev, _) = cx.device("device", args[0], offset, cx.len)?;
        Ok(Box::new(Linear {
            dev,
            offset,
            start: cx.start,
        }))
    }
}

impl Target for Linear {
    fn kind(&self) -> &'static str {
        "linear"
    }

    #[inline]
    fn map(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> MapResult {
        bio.dev = self.dev.id;
        bio.sector += self.offset;
        MapResult::Remapped
    }

    fn linear_remap(&self) -> Option<(DevId, Sector)> {
        Some((self.dev.id, self.offset))
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let c = child(self.dev.id);
        let mut l = Limits::TOP;
        l.stack(&c);
        l.check_alignment(&c, self.offset);
        // The start of this target inside the volume must also respect the child's granule.
        if !(self.start * 512).is_multiple_of(c.logical_block_bytes as u64) {
            l.misaligned = true;
        }
        l
    }

    fn extent(&self, offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Dev {
            dev: self.dev.id,
            sector: self.offset + offset,
            len,
        }
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn args(&self) -> String {
        format!("{} {}", self.dev, self.offset)
    }
}
