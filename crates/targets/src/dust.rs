//! `dust <device_path> <offset> <blksz>`: a linear mapping with a list of bad blocks, as
//! dm-dust: while enabled, a read of a bad block fails with EIO (a "read medium error"), and a
//! write to it removes it from the list and goes through (a drive remapping the sector).
//!
//! Blocks are `blksz` bytes (a power of two, 512 up to 1 GiB and no larger than the target) and
//! are numbered on the underlying device, offset included, as dm does. Bios are split so each
//! lies in one block (dm sets `max_io_len` to the block; stackbd's boundaries are the device's
//! blocks, which are the same ones whenever `offset` is a multiple of the block).
//!
//! Messages, replies and errors are dm-dust's (`dmsetup message`): `addbadblock <block>
//! [<wr_fail_cnt>]`, `removebadblock <block>`, `queryblock <block>`, `countbadblocks`,
//! `clearbadblocks`, `listbadblocks`, `enable`, `disable`, `quiet`. A block with a write-fail
//! count fails that many writes (with EIO) before a write removes it. Where dm only logs the
//! reason of an `-EINVAL`, the error text here is that log line; where dm says nothing (a
//! malformed number) the text says what was wrong. dm accepts a block equal to the device's
//! block count (`block > size` is the check); so does this.
//!
//! Lock-free data path: the bad-block list is an immutable `BTreeMap` (block -> write-fail
//! count) behind an [`ArcSwap`]. Reads only `load` the current snapshot (no lock, no
//! allocation). A change (a message, or the rare write that hits a bad block) copies the map,
//! changes the copy and installs it with compare-and-swap, retrying on a lost race (read-copy-
//! update); readers of the old snapshot finish with it undisturbed.

use arc_swap::ArcSwap;
use stackbd_core::target::{expect_args, parse_num, TargetExtent};
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, DevRef, Limits, MapResult, Op, Sector, Status, Target, TargetCx,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// dm-dust's largest block: 1 GiB.
pub const MAX_BLOCK_SECTORS: Sector = 2_097_152;

type BadBlocks = BTreeMap<u64, u8>;

#[derive(Debug)]
pub struct Dust {
    dev: DevRef,
    /// The underlying device's size: messages refuse blocks past it.
    dev_sectors: Sector,
    offset: Sector,
    blksz: u32,
    /// log2 of sectors per block.
    shift: u32,
    start: Sector,
    /// `fail_read_on_bb`: bad blocks count only while enabled (starts disabled).
    enabled: AtomicBool,
    quiet: AtomicBool,
    bad: ArcSwap<BadBlocks>,
}

impl Dust {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(args, 3, "<device_path> <offset> <blksz>")
            .map_err(|_| ArgError::new("arguments", "Invalid argument count"))?;
        let blksz: u32 = match parse_num("blksz", args[2]) {
            Ok(b) if b != 0 => b,
            _ => return Err(ArgError::new("blksz", "Invalid block size parameter")),
        };
        if blksz < 512 {
            return Err(ArgError::new("blksz", "Block size must be at least 512"));
        }
        if !blksz.is_power_of_two() {
            return Err(ArgError::new("blksz", "Block size must be a power of 2"));
        }
        let spb = (blksz / 512) as Sector;
        if spb > cx.len.min(MAX_BLOCK_SECTORS) {
            return Err(ArgError::new("blksz", "Block size is too large"));
        }
        let offset: Sector = parse_num("offset", args[1])
            .map_err(|_| ArgError::new("offset", "Invalid device offset sector"))?;
        let (dev, info) = cx.device("device_path", args[0], offset, cx.len)?;
        Ok(Box::new(Dust {
            dev,
            dev_sectors: info.size,
            offset,
            blksz,
            shift: spb.trailing_zeros(),
            start: cx.start,
            enabled: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            bad: ArcSwap::from_pointee(BadBlocks::new()),
        }))
    }

    fn quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// Read-copy-update of the list: `f` looks at the current snapshot and returns the new one
    /// (or `None` to leave it) and its answer; retried if another change won the race.
    fn update<R>(&self, mut f: impl FnMut(&BadBlocks) -> (Option<BadBlocks>, R)) -> R {
        loop {
            let cur = self.bad.load_full();
            let (next, r) = f(&cur);
            let Some(next) = next else { return r };
            let prev = self.bad.compare_and_swap(&cur, Arc::new(next));
            if Arc::ptr_eq(&prev, &cur) {
                return r;
            }
        }
    }

    /// A write to bad block `blk` (rare): spend one write failure, or drop the block.
    #[cold]
    fn write_hit(&self, blk: u64) -> MapResult {
        let (r, removed) = self.update(|m| match m.get(&blk) {
            None => (None, (MapResult::Remapped, false)),
            Some(&n) => {
                let mut next = m.clone();
                if n > 0 {
                    next.insert(blk, n - 1);
                    (Some(next), (MapResult::Done(Status::IoError), false))
                } else {
                    next.remove(&blk);
                    (Some(next), (MapResult::Remapped, true))
                }
            }
        });
        if removed && !self.quiet() {
            tracing::info!("dust: block {blk} removed from badblocklist by write");
        }
        r
    }

    /// Largest valid block number for messages (dm: device sectors / sectors per block).
    fn max_block(&self) -> u64 {
        self.dev_sectors >> self.shift
    }

    fn add_block(&self, blk: u64, wr_fail_cnt: u8) -> Result<String, String> {
        let added = self.update(|m| {
            if m.contains_key(&blk) {
                return (None, false);
            }
            let mut next = m.clone();
            next.insert(blk, wr_fail_cnt);
            (Some(next), true)
        });
        if !added {
            let e = format!("dust_add_block: block {blk} already in badblocklist");
            if !self.quiet() {
                tracing::error!("dust: {e}");
            }
            return Err(e);
        }
        if !self.quiet() {
            tracing::info!(
                "dust: dust_add_block: badblock added at block {blk} with write fail count {wr_fail_cnt}"
            );
        }
        Ok(String::new())
    }

    fn remove_block(&self, blk: u64) -> Result<String, String> {
        let removed = self.update(|m| {
            if !m.contains_key(&blk) {
                return (None, false);
            }
            let mut next = m.clone();
            next.remove(&blk);
            (Some(next), true)
        });
        if !removed {
            let e = format!("dust_remove_block: block {blk} not found in badblocklist");
            if !self.quiet() {
                tracing::error!("dust: {e}");
            }
            return Err(e);
        }
        if !self.quiet() {
            tracing::info!("dust: dust_remove_block: badblock removed at block {blk}");
        }
        Ok(String::new())
    }

    fn clear(&self) -> String {
        let n = self.update(|m| {
            if m.is_empty() {
                (None, 0)
            } else {
                (Some(BadBlocks::new()), m.len())
            }
        });
        if n == 0 {
            "dust_clear_badblocks: no badblocks found".to_string()
        } else {
            "dust_clear_badblocks: badblocks cleared".to_string()
        }
    }

    fn list(&self) -> String {
        let m = self.bad.load();
        if m.is_empty() {
            return "No blocks in badblocklist".to_string();
        }
        m.keys().map(|b| format!("{b}\n")).collect()
    }

    /// A block number argument, checked against the device as dm does.
    fn block_arg(&self, s: &str) -> Result<u64, String> {
        let b: u64 = parse_num("block", s).map_err(|e| e.reason)?;
        if b > self.max_block() {
            return Err("selected block value out of range".to_string());
        }
        Ok(b)
    }

    /// The block a device sector lies in.
    #[inline]
    fn block_of(&self, dev_sector: Sector) -> u64 {
        dev_sector >> self.shift
    }
}

impl Target for Dust {
    fn kind(&self) -> &'static str {
        "dust"
    }

    fn map(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> MapResult {
        bio.dev = self.dev.id;
        bio.sector += self.offset;
        if bio.op == Op::Flush || !self.enabled.load(Ordering::Relaxed) {
            return MapResult::Remapped;
        }
        let blk = self.block_of(bio.sector);
        if !self.bad.load().contains_key(&blk) {
            return MapResult::Remapped;
        }
        if bio.op == Op::Read {
            MapResult::Done(Status::IoError)
        } else {
            self.write_hit(blk)
        }
    }

    /// Splits at the device's block boundaries, so a bio lies in one block.
    fn max_io_len(&self, offset: Sector) -> Sector {
        let spb: Sector = 1 << self.shift;
        spb - (self.offset.wrapping_add(offset) & (spb - 1))
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let c = child(self.dev.id);
        let mut l = Limits::TOP;
        l.stack(&c);
        l.check_alignment(&c, self.offset);
        if !(self.start * 512).is_multiple_of(c.logical_block_bytes as u64) {
            l.misaligned = true;
        }
        l
    }

    /// Plain data, not a device range: a copy through dust is emulated as reads and writes,
    /// which see the bad blocks (a device range would let the copy bypass `map`).
    fn extent(&self, _offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Data { len }
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    /// dm's `STATUSTYPE_TABLE`: `<device> <offset> <blksz>`.
    fn args(&self) -> String {
        format!("{} {} {}", self.dev, self.offset, self.blksz)
    }

    /// dm's `STATUSTYPE_INFO`: `<device> fail_read_on_bad_block|bypass verbose|quiet`.
    fn status(&self) -> String {
        format!(
            "{} {} {}",
            self.dev,
            if self.enabled.load(Ordering::Relaxed) {
                "fail_read_on_bad_block"
            } else {
                "bypass"
            },
            if self.quiet() { "quiet" } else { "verbose" }
        )
    }

    fn message(&self, argv: &[&str]) -> Result<String, String> {
        let cmd = argv
            .first()
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        let unrecognized = || Err(format!("unrecognized message '{}' received", argv[0]));
        match argv.len() {
            1 => match cmd.as_str() {
                "addbadblock" | "removebadblock" | "queryblock" => {
                    Err(format!("{} requires an additional argument", argv[0]))
                }
                "disable" => {
                    tracing::info!("dust: disabling read failures on bad sectors");
                    self.enabled.store(false, Ordering::Relaxed);
                    Ok(String::new())
                }
                "enable" => {
                    tracing::info!("dust: enabling read failures on bad sectors");
                    self.enabled.store(true, Ordering::Relaxed);
                    Ok(String::new())
                }
                "countbadblocks" => Ok(format!(
                    "countbadblocks: {} badblock(s) found",
                    self.bad.load().len()
                )),
                "clearbadblocks" => Ok(self.clear()),
                "quiet" => {
                    self.quiet.fetch_xor(true, Ordering::Relaxed);
                    Ok(String::new())
                }
                "listbadblocks" => Ok(self.list()),
                _ => unrecognized(),
            },
            2 => {
                let blk = self.block_arg(argv[1])?;
                match cmd.as_str() {
                    "addbadblock" => self.add_block(blk, 0),
                    "removebadblock" => self.remove_block(blk),
                    "queryblock" => Ok(if self.bad.load().contains_key(&blk) {
                        format!("dust_query_block: block {blk} found in badblocklist")
                    } else {
                        format!("dust_query_block: block {blk} not found in badblocklist")
                    }),
                    _ => unrecognized(),
                }
            }
            3 => {
                let b: u64 = parse_num("block", argv[1]).map_err(|e| e.reason)?;
                let cnt: u64 = parse_num("wr_fail_cnt", argv[2]).map_err(|e| e.reason)?;
                let cnt = u8::try_from(cnt)
                    .map_err(|_| "selected write fail count out of range".to_string())?;
                let blk = self.block_arg(&b.to_string())?;
                match cmd.as_str() {
                    "addbadblock" => self.add_block(blk, cnt),
                    _ => unrecognized(),
                }
            }
            n => Err(format!("invalid number of arguments '{n}'")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dust() -> Dust {
        Dust {
            dev: DevRef {
                id: DevId(0),
                name: "d".into(),
            },
            dev_sectors: 1 << 30,
            offset: 0,
            blksz: 512,
            shift: 0,
            start: 0,
            enabled: AtomicBool::new(true),
            quiet: AtomicBool::new(true),
            bad: ArcSwap::from_pointee(BadBlocks::new()),
        }
    }

    /// Messages and writes change the list from several threads at once: compare-and-swap
    /// loses no change.
    #[test]
    fn concurrent_changes_are_all_kept() {
        let d = dust();
        // Miri checks the same races on fewer blocks (each change copies the whole map).
        let n: u64 = if cfg!(miri) { 12 } else { 300 };
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let d = &d;
                s.spawn(move || {
                    for i in 0..n {
                        assert_eq!(d.add_block(t * 1000 + i, 1), Ok(String::new()));
                    }
                    for i in 0..n {
                        // The first write spends the fail count, the second removes the block.
                        let b = t * 1000 + i;
                        assert_eq!(d.write_hit(b), MapResult::Done(Status::IoError));
                        if i % 2 == 0 {
                            assert_eq!(d.write_hit(b), MapResult::Remapped);
                        }
                    }
                });
            }
        });
        let m = d.bad.load();
        assert_eq!(m.len() as u64, 4 * n / 2);
        assert!(m.iter().all(|(b, &n)| b % 2 == 1 && n == 0));
    }

    #[test]
    fn splits_at_device_blocks() {
        let mut d = dust();
        d.shift = 3;
        d.offset = 5;
        assert_eq!(d.max_io_len(0), 3);
        assert_eq!(d.max_io_len(3), 8);
        assert_eq!(d.max_io_len(4), 7);
        assert_eq!(d.block_of(7), 0);
        assert_eq!(d.block_of(8), 1);
    }
}
