//! What a device accepts, and how it stacks from the leaves up (after `blk_stack_limits`).

use crate::bio::FRAME_WORD;

/// Limits of one device. Sizes in bytes where the field says so, else in sectors.
/// A maximum of 0 means "no limit" (except `max_copy_sectors`, where 0 means "no native copy").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub logical_block_bytes: u32,
    pub physical_block_bytes: u32,
    pub io_min_bytes: u32,
    pub io_opt_bytes: u32,
    pub alignment_offset_bytes: u32,
    /// Some layer could not honour the alignment of the one below.
    pub misaligned: bool,
    /// Largest I/O (0 = unlimited).
    pub max_sectors: u32,
    /// I/O must not cross a multiple of this (0 = no boundary), e.g. a stripe chunk.
    pub chunk_sectors: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Largest copy that can be offloaded; 0 = copy is emulated.
    pub max_copy_sectors: u32,
    /// Every leaf under can copy by itself.
    pub copy_native: bool,
    /// Completions can be polled (every leaf under can).
    pub poll: bool,
    /// Submissions never block (every layer under honours `NOWAIT`).
    pub nowait: bool,
    /// Frame context bytes an I/O needs to traverse the whole stack under here.
    pub per_io_bytes: u32,
    /// Frames an I/O may hold at once under here.
    pub frame_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::TOP
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Least common multiple, ignoring zeros; saturates rather than overflow.
fn lcm_not_zero(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        _ => ((a as u64 / gcd(a, b) as u64) * b as u64).min(u32::MAX as u64) as u32,
    }
}

fn gcd_not_zero(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        _ => gcd(a, b),
    }
}

fn min_not_zero(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        _ => a.min(b),
    }
}

impl Limits {
    /// The neutral element of stacking: what a layer starts from before it stacks its children.
    pub const TOP: Limits = Limits {
        logical_block_bytes: 512,
        physical_block_bytes: 512,
        io_min_bytes: 512,
        io_opt_bytes: 0,
        alignment_offset_bytes: 0,
        misaligned: false,
        max_sectors: 0,
        chunk_sectors: 0,
        max_discard_sectors: 0,
        max_write_zeroes_sectors: 0,
        max_copy_sectors: u32::MAX,
        copy_native: true,
        poll: true,
        nowait: true,
        per_io_bytes: 0,
        frame_depth: 0,
    };

    /// Stacks the limits of child `b` into `self` (the parent), as `blk_stack_limits` does.
    pub fn stack(&mut self, b: &Limits) {
        self.max_sectors = min_not_zero(self.max_sectors, b.max_sectors);
        self.max_discard_sectors = min_not_zero(self.max_discard_sectors, b.max_discard_sectors);
        self.max_write_zeroes_sectors =
            min_not_zero(self.max_write_zeroes_sectors, b.max_write_zeroes_sectors);
        // Copy offload is only as wide as the narrowest child; a child without it turns it off.
        self.max_copy_sectors = self.max_copy_sectors.min(b.max_copy_sectors);
        self.copy_native &= b.copy_native;
        self.logical_block_bytes = self.logical_block_bytes.max(b.logical_block_bytes);
        self.physical_block_bytes = self.physical_block_bytes.max(b.physical_block_bytes);
        self.io_min_bytes = self.io_min_bytes.max(b.io_min_bytes);
        self.alignment_offset_bytes = self.alignment_offset_bytes.max(b.alignment_offset_bytes);
        self.io_opt_bytes = lcm_not_zero(self.io_opt_bytes, b.io_opt_bytes);
        self.chunk_sectors = gcd_not_zero(self.chunk_sectors, b.chunk_sectors);
        self.misaligned |= b.misaligned;
        self.poll &= b.poll;
        self.nowait &= b.nowait;
        self.per_io_bytes = self.per_io_bytes.max(b.per_io_bytes);
        self.frame_depth = self.frame_depth.max(b.frame_depth);
        if self.physical_block_bytes < self.logical_block_bytes {
            self.physical_block_bytes = self.logical_block_bytes;
        }
        if self.io_min_bytes < self.physical_block_bytes {
            self.io_min_bytes = self.physical_block_bytes;
        }
    }

    /// Adds one layer's own frame on top of the deepest child's need.
    pub fn add_frame(&mut self, ctx_bytes: usize) {
        let words = ctx_bytes.div_ceil(FRAME_WORD) as u32;
        self.per_io_bytes += words * FRAME_WORD as u32;
        self.frame_depth += 1;
    }

    /// Marks the limits misaligned when a child is mapped at `start_sector` and that offset does
    /// not respect the child's physical block size or alignment.
    pub fn check_alignment(&mut self, child: &Limits, start_sector: u64) {
        let start_bytes = start_sector * 512;
        let granule = child.physical_block_bytes.max(child.io_min_bytes) as u64;
        if granule > 0
            && !(start_bytes + child.alignment_offset_bytes as u64).is_multiple_of(granule)
        {
            self.misaligned = true;
        }
    }

    /// Logical block size in sectors.
    pub fn logical_block_sectors(&self) -> u32 {
        (self.logical_block_bytes / 512).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> Limits {
        Limits {
            max_copy_sectors: 0,
            copy_native: false,
            ..Limits::TOP
        }
    }

    fn stacked(children: &[Limits]) -> Limits {
        let mut t = Limits::TOP;
        for c in children {
            t.stack(c);
        }
        t
    }

    #[test]
    fn maximums_take_the_smaller_non_zero() {
        let a = Limits {
            max_sectors: 256,
            max_discard_sectors: 0,
            max_write_zeroes_sectors: 64,
            ..leaf()
        };
        let b = Limits {
            max_sectors: 0,
            max_discard_sectors: 1024,
            max_write_zeroes_sectors: 128,
            ..leaf()
        };
        let t = stacked(&[a, b]);
        assert_eq!(t.max_sectors, 256);
        assert_eq!(t.max_discard_sectors, 1024);
        assert_eq!(t.max_write_zeroes_sectors, 64);
    }

    #[test]
    fn block_sizes_io_min_and_alignment_take_the_larger() {
        let a = Limits {
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            io_min_bytes: 4096,
            ..leaf()
        };
        let b = Limits {
            logical_block_bytes: 4096,
            physical_block_bytes: 4096,
            io_min_bytes: 8192,
            ..leaf()
        };
        let c = Limits {
            alignment_offset_bytes: 512,
            ..leaf()
        };
        let t = stacked(&[a, b, c]);
        assert_eq!(t.logical_block_bytes, 4096);
        assert_eq!(t.physical_block_bytes, 4096);
        assert_eq!(t.io_min_bytes, 8192);
        assert_eq!(t.alignment_offset_bytes, 512);
    }

    #[test]
    fn physical_and_io_min_never_below_logical() {
        let a = Limits {
            logical_block_bytes: 4096,
            physical_block_bytes: 512,
            io_min_bytes: 512,
            ..leaf()
        };
        let t = stacked(&[a]);
        assert_eq!(t.physical_block_bytes, 4096);
        assert_eq!(t.io_min_bytes, 4096);
    }

    #[test]
    fn io_opt_takes_the_least_common_multiple() {
        let t = stacked(&[
            Limits {
                io_opt_bytes: 0,
                ..leaf()
            },
            Limits {
                io_opt_bytes: 65536 * 3,
                ..leaf()
            },
            Limits {
                io_opt_bytes: 131072,
                ..leaf()
            },
        ]);
        assert_eq!(t.io_opt_bytes, 65536 * 6);
        let big = stacked(&[
            Limits {
                io_opt_bytes: u32::MAX,
                ..leaf()
            },
            Limits {
                io_opt_bytes: u32::MAX - 1,
                ..leaf()
            },
        ]);
        assert_eq!(big.io_opt_bytes, u32::MAX, "saturates");
    }

    #[test]
    fn chunk_boundaries_take_the_greatest_common_divisor() {
        let t = stacked(&[
            Limits {
                chunk_sectors: 0,
                ..leaf()
            },
            Limits {
                chunk_sectors: 96,
                ..leaf()
            },
            Limits {
                chunk_sectors: 128,
                ..leaf()
            },
        ]);
        assert_eq!(t.chunk_sectors, 32);
    }

    #[test]
    fn misaligned_is_or_ed_up() {
        assert!(!stacked(&[leaf(), leaf()]).misaligned);
        assert!(
            stacked(&[
                leaf(),
                Limits {
                    misaligned: true,
                    ..leaf()
                }
            ])
            .misaligned
        );
        let mut t = Limits::TOP;
        let child = Limits {
            physical_block_bytes: 4096,
            ..leaf()
        };
        t.check_alignment(&child, 8);
        assert!(!t.misaligned, "4 KiB offset on a 4 KiB device is aligned");
        t.check_alignment(&child, 1);
        assert!(t.misaligned, "one sector in is not");
    }

    #[test]
    fn poll_and_nowait_are_and_ed() {
        let can = Limits {
            poll: true,
            nowait: true,
            ..leaf()
        };
        let cannot_poll = Limits { poll: false, ..can };
        let cannot_nowait = Limits {
            nowait: false,
            ..can
        };
        let t = stacked(&[can, can]);
        assert!(t.poll && t.nowait);
        let t = stacked(&[can, cannot_poll]);
        assert!(
            !t.poll && t.nowait,
            "one leaf that cannot poll makes the volume not pollable"
        );
        let t = stacked(&[cannot_nowait, can]);
        assert!(t.poll && !t.nowait);
    }

    #[test]
    fn copy_offload_stacks_like_a_maximum_and_needs_every_child() {
        let a = Limits {
            max_copy_sectors: 2048,
            copy_native: true,
            ..leaf()
        };
        let b = Limits {
            max_copy_sectors: 512,
            copy_native: true,
            ..leaf()
        };
        let t = stacked(&[a, b]);
        assert_eq!(t.max_copy_sectors, 512);
        assert!(t.copy_native);
        let t = stacked(&[a, leaf()]);
        assert_eq!(
            t.max_copy_sectors, 0,
            "a child without offload turns it off"
        );
        assert!(!t.copy_native);
    }

    #[test]
    fn per_io_bytes_is_own_frame_plus_deepest_child() {
        let shallow = Limits {
            per_io_bytes: 16,
            frame_depth: 1,
            ..leaf()
        };
        let deep = Limits {
            per_io_bytes: 48,
            frame_depth: 3,
            ..leaf()
        };
        let mut t = stacked(&[shallow, deep]);
        t.add_frame(12); // rounds up to whole words
        assert_eq!(t.per_io_bytes, 48 + 16);
        assert_eq!(t.frame_depth, 4);
    }
}
