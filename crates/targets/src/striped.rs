//! `striped <#stripes> <chunk_size> (<device> <offset>)+`: chunks of `chunk_size` sectors go
//! round-robin over the stripes. Bios are split at chunk boundaries by the core (`max_io_len`).
//! It pushes a small frame (the stripe index) so completions can count errors per stripe for
//! `status`, as dm-stripe reports `A` (alive) or `D` (dead) per device.

use stackbd_core::target::{parse_num, TargetExtent};
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, DevRef, Endio, Limits, MapResult, Op, Sector, Status, Target,
    TargetCx,
};
use std::sync::atomic::{AtomicU32, Ordering};

/// dm-stripe's minimum: a chunk of one page.
pub const MIN_CHUNK_SECTORS: Sector = 8;

#[derive(Debug)]
struct Stripe {
    dev: DevRef,
    offset: Sector,
    errors: AtomicU32,
}

#[derive(Debug)]
pub struct Striped {
    chunk: Sector,
    stripes: Vec<Stripe>,
}

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct StripeFrame {
    stripe: u32,
}

impl Striped {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        const USAGE: &str = "<#stripes> <chunk_size> (<device> <offset>)+";
        if args.len() < 2 {
            return Err(ArgError::new(
                "arguments",
                format!(
                    "expected at least 4 arguments ({USAGE}), got {}",
                    args.len()
                ),
            ));
        }
        let n: u32 = parse_num("#stripes", args[0])?;
        if n == 0 {
            return Err(ArgError::new("#stripes", "must be at least 1"));
        }
        let chunk: Sector = parse_num("chunk_size", args[1])?;
        if chunk < MIN_CHUNK_SECTORS {
            return Err(ArgError::new(
                "chunk_size",
                format!("chunk size {chunk} is below {MIN_CHUNK_SECTORS} sectors (one page)"),
            ));
        }
        let want = 2 + 2 * n as usize;
        if args.len() != want {
            return Err(ArgError::new(
                "arguments",
                format!(
                    "{n} stripes need {want} arguments ({USAGE}), got {}",
                    args.len()
                ),
            ));
        }
        if !cx.len.is_multiple_of(n as Sector) {
            return Err(ArgError::new(
                "length",
                format!("target length {} does not divide into {n} stripes", cx.len),
            ));
        }
        let per_stripe = cx.len / n as Sector;
        if !per_stripe.is_multiple_of(chunk) {
            return Err(ArgError::new(
                "length",
                format!("target length {} does not divide into whole chunks of {chunk} sectors per stripe", cx.len),
            ));
        }
        let mut stripes = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let offset: Sector = parse_num(&format!("offset #{i}"), args[3 + 2 * i])?;
            let (dev, _) =
                cx.device(&format!("device #{i}"), args[2 + 2 * i], offset, per_stripe)?;
            stripes.push(Stripe {
                dev,
                offset,
                errors: AtomicU32::new(0),
            });
        }
        Ok(Box::new(Striped { chunk, stripes }))
    }

    /// Stripe index and sector on that stripe's device for a target-relative sector.
    #[inline]
    fn locate(&self, offset: Sector) -> (usize, Sector) {
        let n = self.stripes.len() as Sector;
        let chunk = offset / self.chunk;
        let within = offset % self.chunk;
        let stripe = (chunk % n) as usize;
        (
            stripe,
            (chunk / n) * self.chunk + within + self.stripes[stripe].offset,
        )
    }
}

impl Target for Striped {
    fn kind(&self) -> &'static str {
        "striped"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let (stripe, sector) = if bio.op == Op::Flush {
            let i = bio.map_index as usize;
            (i, 0)
        } else {
            self.locate(bio.sector)
        };
        cx.push(
            bio,
            &StripeFrame {
                stripe: stripe as u32,
            },
        );
        bio.dev = self.stripes[stripe].dev.id;
        bio.sector = sector;
        MapResult::Remapped
    }

    #[inline]
    fn max_io_len(&self, offset: Sector) -> Sector {
        self.chunk - offset % self.chunk
    }

    fn flush_devices(&self) -> Vec<DevId> {
        self.stripes.iter().map(|s| s.dev.id).collect()
    }

    fn frame_bytes(&self) -> usize {
        std::mem::size_of::<StripeFrame>()
    }

    fn end_io(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        // Unsupported operations and retries say nothing about the device's health.
        if !bio.status.is_ok()
            && !matches!(
                bio.status,
                Status::NotSupported | Status::Again | Status::Invalid
            )
        {
            let f: StripeFrame = bio.popped_ctx();
            self.stripes[f.stripe as usize]
                .errors
                .fetch_add(1, Ordering::Relaxed);
        }
        Endio::Done
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let mut l = Limits::TOP;
        for s in &self.stripes {
            let c = child(s.dev.id);
            l.stack(&c);
            l.check_alignment(&c, s.offset);
        }
        let chunk_bytes = (self.chunk * 512).min(u32::MAX as u64) as u32;
        l.io_min_bytes = l.io_min_bytes.max(chunk_bytes);
        l.io_opt_bytes = chunk_bytes.saturating_mul(self.stripes.len() as u32);
        l
    }

    fn extent(&self, offset: Sector, len: Sector) -> TargetExtent {
        let (stripe, sector) = self.locate(offset);
        TargetExtent::Dev {
            dev: self.stripes[stripe].dev.id,
            sector,
            len: len.min(self.max_io_len(offset)),
        }
    }

    fn devices(&self) -> Vec<DevId> {
        self.stripes.iter().map(|s| s.dev.id).collect()
    }

    fn args(&self) -> String {
        let mut s = format!("{} {}", self.stripes.len(), self.chunk);
        for st in &self.stripes {
            s.push_str(&format!(" {} {}", st.dev, st.offset));
        }
        s
    }

    /// dm-stripe's format: `<#stripes> <dev>... 1 <A|D per stripe>`.
    fn status(&self) -> String {
        let mut s = format!("{}", self.stripes.len());
        for st in &self.stripes {
            s.push(' ');
            s.push_str(&st.dev.name);
        }
        s.push_str(" 1 ");
        for st in &self.stripes {
            s.push(if st.errors.load(Ordering::Relaxed) > 0 {
                'D'
            } else {
                'A'
            });
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn striped(n: usize, chunk: Sector) -> Striped {
        Striped {
            chunk,
            stripes: (0..n)
                .map(|i| Stripe {
                    dev: DevRef {
                        id: DevId(i as u32),
                        name: format!("d{i}"),
                    },
                    offset: 100 * i as Sector,
                    errors: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    #[test]
    fn chunks_go_round_robin() {
        let s = striped(3, 8);
        assert_eq!(s.locate(0), (0, 0));
        assert_eq!(s.locate(7), (0, 7));
        assert_eq!(s.locate(8), (1, 100));
        assert_eq!(s.locate(17), (2, 201));
        assert_eq!(s.locate(24), (0, 8));
        assert_eq!(s.max_io_len(0), 8);
        assert_eq!(s.max_io_len(13), 3);
    }

    #[test]
    fn non_power_of_two_chunks_map() {
        let s = striped(2, 24);
        assert_eq!(s.locate(23), (0, 23));
        assert_eq!(s.locate(24), (1, 100));
        assert_eq!(s.locate(48), (0, 24));
        assert_eq!(s.max_io_len(50), 22);
    }

    #[test]
    fn status_marks_stripes_with_errors() {
        let s = striped(2, 8);
        assert_eq!(s.status(), "2 d0 d1 1 AA");
        s.stripes[1].errors.fetch_add(1, Ordering::Relaxed);
        assert_eq!(s.status(), "2 d0 d1 1 AD");
        assert_eq!(s.args(), "2 8 d0 0 d1 100");
    }
}
