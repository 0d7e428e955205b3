//! `flakey <dev path> <offset> <up interval> <down interval> [<num_features> [<feature arguments>]]`:
//! a linear mapping that misbehaves periodically, as dm-flakey does.
//!
//! From the table load (the constructor, on a monotonic clock) the device is up for
//! `<up interval>` seconds, then unreliable for `<down interval>` seconds, and the cycle repeats.
//! A second counts only once it has fully passed (dm divides elapsed jiffies by `HZ`).
//!
//! Features (case-insensitive, printed back lowercase in dm's canonical order):
//! - `error_reads`: reads fail with EIO while down.
//! - `drop_writes`: writes (and discards, write-zeroes, flushes: dm's empty flush is a write)
//!   complete successfully while down but are not passed down.
//! - `error_writes`: writes fail with EIO while down.
//! - `corrupt_bio_byte <Nth_byte> <r|w> <value> <flags>`: while down, byte `Nth_byte` (from 1)
//!   of each matching bio with data is set to `value`. `flags` 0 matches every bio; otherwise a
//!   bio matches when all the bits of `flags` are set in its `bi_opf` as Linux would form it
//!   (see [`dm_opf`]).
//! - `random_read_corrupt <p>` / `random_write_corrupt <p>`: while down, a bio is corrupted
//!   with probability `p / 1000000000`: one random byte gets a random value.
//!
//! No feature at all (or features that all turned out disabled, such as
//! `random_read_corrupt 0`) means `error_reads error_writes`: all I/O fails while down, and the
//! table line prints it so, as dm does.
//!
//! Reads are corrupted in `end_io`, in the bio's own buffer: the data is the reader's. A write
//! to corrupt must not change the submitter's buffer: `map` copies it into a pooled bounce
//! buffer (`TargetCx::bounce`), corrupts the copy, sends the copy down as a child bio and holds
//! the original until the child is done (`MapResult::Hold`); `child_done` gives the buffer back
//! and `unparked` completes the write with the child's status. Nothing is allocated per I/O
//! once the reactor's bounce pool is warm; with the pool exhausted the write is requeued.
//!
//! Differences from dm: trailing arguments after the feature group are refused (dm ignores them);
//! numbers are plain decimal digits.

use stackbd_core::target::{parse_num, TargetExtent};
use stackbd_core::{
    ArgError, Bio, BioFlags, CtorCx, DevId, DevRef, Endio, Limits, MapResult, Op, Sector, Status,
    Target, TargetCx,
};
use stackbd_core::{ChildIo, ReactorInit};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Children's statuses by key (bounce id), kept until their held writes unpark.
struct WriteResults(Vec<(u64, Status)>);

/// dm-flakey's probability scale: `p / PROBABILITY_BASE` is the chance to corrupt a bio.
pub const PROBABILITY_BASE: u32 = 1_000_000_000;

/// At most this many feature arguments (dm: `{0, 11, "Invalid number of feature args"}`).
const MAX_FEATURE_ARGS: u32 = 11;

/// What Linux calls a bio's direction (`bio_data_dir`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

impl Dir {
    /// A bio's direction as dm sees it. A flush is a write: bio-based dm receives an empty
    /// flush as `REQ_OP_WRITE | REQ_PREFLUSH`.
    fn of(op: Op) -> Dir {
        match op {
            Op::Read => Dir::Read,
            _ => Dir::Write,
        }
    }
}

/// Linux request-flag bits (`enum req_flag_bits`, `include/linux/blk_types.h`, 6.x) that a
/// stackbd bio can carry. Bits stackbd has no notion of (FAILFAST_*, SYNC, META, PRIO, IDLE,
/// INTEGRITY, RAHEAD, BACKGROUND, ALLOC_CACHE, SWAP, DRV, FS_PRIVATE, ATOMIC, NOUNMAP) are never
/// set, so a `corrupt_bio_byte` flags mask that asks for one of them matches no bio.
pub mod req {
    pub const OP_READ: u32 = 0;
    pub const OP_WRITE: u32 = 1;
    pub const OP_DISCARD: u32 = 3;
    pub const OP_WRITE_ZEROES: u32 = 9;
    pub const NOMERGE: u32 = 1 << 14;
    pub const FUA: u32 = 1 << 17;
    pub const PREFLUSH: u32 = 1 << 18;
    pub const NOWAIT: u32 = 1 << 21;
    pub const POLLED: u32 = 1 << 22;
}

/// The `bi_opf` Linux would give this bio: the op in the low 8 bits, then the flags it maps to.
/// A flush is `REQ_OP_WRITE | REQ_PREFLUSH`; a copy (no upstream op) is counted as a write.
pub fn dm_opf(op: Op, flags: BioFlags) -> u32 {
    let mut opf = match op {
        Op::Read => req::OP_READ,
        Op::Write | Op::Copy => req::OP_WRITE,
        Op::Flush => req::OP_WRITE | req::PREFLUSH,
        Op::Discard => req::OP_DISCARD,
        Op::WriteZeroes => req::OP_WRITE_ZEROES,
    };
    for (ours, theirs) in [
        (BioFlags::FUA, req::FUA),
        (BioFlags::PREFLUSH, req::PREFLUSH),
        (BioFlags::NOWAIT, req::NOWAIT),
        (BioFlags::POLLED, req::POLLED),
        (BioFlags::NOMERGE, req::NOMERGE),
    ] {
        if flags.contains(ours) {
            opf |= theirs;
        }
    }
    opf
}

/// `corrupt_bio_byte <Nth_byte> <direction> <value> <flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CorruptByte {
    /// 1-based byte index in the bio's data.
    pub nth: u32,
    pub dir: Dir,
    pub value: u8,
    /// `bi_opf` bits that must all be set (0: every bio).
    pub flags: u32,
}

/// A parsed flakey table line (before the device is resolved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlakeyArgs {
    pub dev: String,
    pub offset: Sector,
    pub up: u32,
    pub down: u32,
    pub error_reads: bool,
    pub drop_writes: bool,
    pub error_writes: bool,
    pub corrupt: Option<CorruptByte>,
    /// Probabilities out of [`PROBABILITY_BASE`]; 0 is off.
    pub random_read: u32,
    pub random_write: u32,
}

fn bad(field: &str, reason: &str) -> ArgError {
    ArgError::new(field, reason)
}

/// `dm_read_arg`: a `u32` within `[min, max]`, else `err`.
fn read_u32(field: &str, s: Option<&str>, min: u32, max: u32, err: &str) -> Result<u32, ArgError> {
    let s = s.ok_or_else(|| bad(field, err))?;
    match parse_num::<u32>(field, s) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(bad(field, err)),
    }
}

impl FlakeyArgs {
    /// Parses dm-flakey's arguments, with dm's checks and error texts.
    pub fn parse(args: &[&str]) -> Result<FlakeyArgs, ArgError> {
        if args.len() < 4 {
            return Err(bad("arguments", "Invalid argument count"));
        }
        let offset: Sector =
            parse_num("offset", args[1]).map_err(|_| bad("offset", "Invalid device sector"))?;
        let up = read_u32(
            "up interval",
            Some(args[2]),
            0,
            u32::MAX,
            "Invalid up interval",
        )?;
        let down = read_u32(
            "down interval",
            Some(args[3]),
            0,
            u32::MAX,
            "Invalid down interval",
        )?;
        match up.checked_add(down) {
            Some(0) => return Err(bad("down interval", "Total (up + down) interval is zero")),
            None => return Err(bad("down interval", "Interval overflow")),
            Some(_) => {}
        }
        let mut a = FlakeyArgs {
            dev: args[0].to_string(),
            offset,
            up,
            down,
            error_reads: false,
            drop_writes: false,
            error_writes: false,
            corrupt: None,
            random_read: 0,
            random_write: 0,
        };
        a.parse_features(&args[4..])?;
        Ok(a)
    }

    fn parse_features(&mut self, rest: &[&str]) -> Result<(), ArgError> {
        const F: &str = "feature arguments";
        let mut it = rest.iter().copied();
        let mut argc = match it.next() {
            None => 0,
            Some(n) => match parse_num::<u32>("num_features", n) {
                Ok(n) if n <= MAX_FEATURE_ARGS && (n as usize) < rest.len() => n,
                _ => return Err(bad("num_features", "Invalid number of feature args")),
            },
        };
        if rest.len() > 1 + argc as usize {
            return Err(bad(
                F,
                &format!(
                    "{} argument(s) after the {argc} feature argument(s)",
                    rest.len() - 1 - argc as usize
                ),
            ));
        }
        while argc > 0 {
            let name = it.next().unwrap_or_default();
            argc -= 1;
            match name.to_ascii_lowercase().as_str() {
                "error_reads" => {
                    if std::mem::replace(&mut self.error_reads, true) {
                        return Err(bad(F, "Feature error_reads duplicated"));
                    }
                }
                "drop_writes" => {
                    if std::mem::replace(&mut self.drop_writes, true) {
                        return Err(bad(F, "Feature drop_writes duplicated"));
                    } else if self.error_writes {
                        return Err(bad(
                            F,
                            "Feature drop_writes conflicts with feature error_writes",
                        ));
                    }
                }
                "error_writes" => {
                    if std::mem::replace(&mut self.error_writes, true) {
                        return Err(bad(F, "Feature error_writes duplicated"));
                    } else if self.drop_writes {
                        return Err(bad(
                            F,
                            "Feature error_writes conflicts with feature drop_writes",
                        ));
                    }
                }
                "corrupt_bio_byte" => {
                    if self.corrupt.is_some() {
                        return Err(bad(F, "Feature corrupt_bio_byte duplicated"));
                    } else if argc < 4 {
                        return Err(bad(F, "Feature corrupt_bio_byte requires 4 parameters"));
                    }
                    argc -= 4;
                    let nth = read_u32(
                        "Nth_byte",
                        it.next(),
                        1,
                        u32::MAX,
                        "Invalid corrupt bio byte",
                    )?;
                    let dir = match it.next().map(str::to_ascii_lowercase).as_deref() {
                        Some("r") => Dir::Read,
                        Some("w") => Dir::Write,
                        _ => {
                            return Err(bad("direction", "Invalid corrupt bio direction (r or w)"))
                        }
                    };
                    let value = read_u32(
                        "value",
                        it.next(),
                        0,
                        255,
                        "Invalid corrupt value to write into bio byte (0-255)",
                    )? as u8;
                    let flags = read_u32(
                        "flags",
                        it.next(),
                        0,
                        u32::MAX,
                        "Invalid corrupt bio flags mask",
                    )?;
                    self.corrupt = Some(CorruptByte {
                        nth,
                        dir,
                        value,
                        flags,
                    });
                }
                f @ ("random_read_corrupt" | "random_write_corrupt") => {
                    let read = f == "random_read_corrupt";
                    let slot = if read {
                        &mut self.random_read
                    } else {
                        &mut self.random_write
                    };
                    if *slot != 0 {
                        return Err(bad(F, &format!("Feature {f} duplicated")));
                    } else if argc == 0 {
                        return Err(bad(F, &format!("Feature {f} requires a parameter")));
                    }
                    argc -= 1;
                    *slot = read_u32(
                        f,
                        it.next(),
                        0,
                        PROBABILITY_BASE,
                        "Invalid random corrupt argument",
                    )?;
                }
                _ => return Err(bad(F, "Unrecognised flakey feature requested")),
            }
        }
        let corrupt_dir = |d| self.corrupt.is_some_and(|c| c.dir == d);
        if self.drop_writes && (corrupt_dir(Dir::Write) || self.random_write != 0) {
            return Err(bad(F, "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set"));
        } else if self.error_writes && (corrupt_dir(Dir::Write) || self.random_write != 0) {
            return Err(bad(F, "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set"));
        } else if self.error_reads && (corrupt_dir(Dir::Read) || self.random_read != 0) {
            return Err(bad(F, "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set"));
        }
        if self.corrupt.is_none()
            && !self.error_reads
            && !self.drop_writes
            && !self.error_writes
            && self.random_read == 0
            && self.random_write == 0
        {
            // dm's default: all I/O fails while down.
            self.error_reads = true;
            self.error_writes = true;
        }
        Ok(())
    }

    /// Write corruption needs a bounce buffer (the submitter's data must stay intact).
    pub fn corrupts_writes(&self) -> bool {
        self.random_write != 0 || self.corrupt.is_some_and(|c| c.dir == Dir::Write)
    }

    /// dm's `STATUSTYPE_TABLE` text (the device printed as `dev`).
    pub fn table_args(&self, dev: &str) -> String {
        let count = self.error_reads as u32
            + self.drop_writes as u32
            + self.error_writes as u32
            + self.corrupt.is_some() as u32 * 5
            + (self.random_read > 0) as u32 * 2
            + (self.random_write > 0) as u32 * 2;
        let mut s = format!("{dev} {} {} {} {count}", self.offset, self.up, self.down);
        if self.error_reads {
            s.push_str(" error_reads");
        }
        if self.drop_writes {
            s.push_str(" drop_writes");
        } else if self.error_writes {
            s.push_str(" error_writes");
        }
        if let Some(c) = self.corrupt {
            let d = if c.dir == Dir::Write { 'w' } else { 'r' };
            s.push_str(&format!(
                " corrupt_bio_byte {} {d} {} {}",
                c.nth, c.value, c.flags
            ));
        }
        if self.random_read > 0 {
            s.push_str(&format!(" random_read_corrupt {}", self.random_read));
        }
        if self.random_write > 0 {
            s.push_str(&format!(" random_write_corrupt {}", self.random_write));
        }
        s
    }

    /// True if `secs` whole seconds after the table load fall in a down interval.
    pub fn down_at(&self, secs: u64) -> bool {
        let period = self.up as u64 + self.down as u64; // non-zero: checked at parse
        secs % period >= self.up as u64
    }
}

/// A flakey target instance.
#[derive(Debug)]
pub struct Flakey {
    dev: DevRef,
    a: FlakeyArgs,
    start: Sector,
    /// The table load: intervals are counted from here.
    born: Instant,
    /// splitmix64 state for the random corruptions (shared, lock-free).
    rng: AtomicU64,
}

/// Pushed on reads that may be corrupted at completion (down interval, read corruption on).
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct FlakeyFrame {
    /// Always 1: the bio was mapped while down.
    down: u32,
}

impl Flakey {
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        let a = FlakeyArgs::parse(args)?;
        let born = Instant::now();
        let (dev, _) = cx.device("dev path", &a.dev, a.offset, cx.len)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (std::ptr::from_ref(cx) as usize as u64);
        Ok(Box::new(Flakey {
            dev,
            a,
            start: cx.start,
            born,
            rng: AtomicU64::new(seed),
        }))
    }

    fn is_down(&self) -> bool {
        self.a.down_at(self.born.elapsed().as_secs())
    }

    /// splitmix64 over a shared counter: lock-free, good enough to pick bytes.
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// dm's draw: corrupt when `rnd % PROBABILITY_BASE < p`.
    fn chance(&self, p: u32) -> bool {
        p != 0 && self.random() % u64::from(PROBABILITY_BASE) < u64::from(p)
    }

    /// Read corruption is configured (decided at `end_io`, so a frame is needed).
    fn corrupts_reads(&self) -> bool {
        self.a.random_read != 0 || self.a.corrupt.is_some_and(|c| c.dir == Dir::Read)
    }

    /// What happens to a bio mapped while down; `None`: pass it down.
    #[inline]
    fn down_action(&self, bio: &Bio) -> Option<MapResult> {
        match Dir::of(bio.op) {
            Dir::Read if self.a.error_reads => Some(MapResult::Done(Status::IoError)),
            Dir::Read => None,
            Dir::Write if self.a.drop_writes => Some(MapResult::Done(Status::Ok)),
            Dir::Write if self.a.error_writes => Some(MapResult::Done(Status::IoError)),
            Dir::Write => None,
        }
    }

    /// Where and what to corrupt in a write mapped while down, if anything: (byte, value) for
    /// `corrupt_bio_byte ... w`, then a random byte for `random_write_corrupt`.
    fn write_damage(&self, bio: &Bio) -> [Option<(usize, u8)>; 2] {
        let len = bio.data.len();
        let mut out = [None, None];
        if let Some(c) = self.a.corrupt {
            let at = c.nth as usize - 1; // nth >= 1
            if c.dir == Dir::Write && dm_opf(bio.op, bio.flags) & c.flags == c.flags && at < len {
                out[0] = Some((at, c.value));
            }
        }
        if len > 0 && self.chance(self.a.random_write) {
            let r = self.random();
            out[1] = Some(((r as u32 as usize) % len, (r >> 32) as u8));
        }
        out
    }

    /// Sends a corrupted copy of a write down through a bounce buffer; holds the write.
    fn corrupt_write(
        &self,
        bio: &Bio,
        cx: &mut TargetCx<'_>,
        damage: [Option<(usize, u8)>; 2],
    ) -> MapResult {
        let Some(b) = cx.bounce(bio.data.len()) else {
            return MapResult::Requeue;
        };
        let copy = b.data();
        bio.data.copy_to(0, &copy, 0, bio.data.len());
        for (at, v) in damage.into_iter().flatten() {
            copy.write_from(at, &[v]);
        }
        cx.submit_child(ChildIo {
            op: Op::Write,
            flags: bio.flags,
            dev: self.dev.id,
            sector: bio.sector + self.a.offset,
            sectors: bio.sectors,
            copy_src: 0,
            data: copy,
            tag: b.id() as u64,
        });
        MapResult::Hold { key: b.id() as u64 }
    }

    /// Corrupts one byte of a completed read (the read's own buffer).
    fn corrupt_read(&self, bio: &Bio) {
        let len = bio.data.len();
        if len == 0 {
            return;
        }
        if let Some(c) = self.a.corrupt {
            let matches = dm_opf(bio.op, bio.flags) & c.flags == c.flags;
            let at = c.nth as usize - 1; // nth >= 1
            if c.dir == Dir::Read && matches && at < len {
                bio.data.write_from(at, &[c.value]);
            }
        }
        if self.chance(self.a.random_read) {
            let r = self.random();
            let at = (r as u32 as usize) % len;
            bio.data.write_from(at, &[(r >> 32) as u8]);
        }
    }
}

impl Target for Flakey {
    fn kind(&self) -> &'static str {
        "flakey"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        if self.is_down() {
            if let Some(r) = self.down_action(bio) {
                return r;
            }
            if bio.op == Op::Write && self.a.corrupts_writes() {
                let damage = self.write_damage(bio);
                if damage.iter().any(Option::is_some) {
                    return self.corrupt_write(bio, cx, damage);
                }
            }
            if bio.op == Op::Read && !bio.data.is_empty() && self.corrupts_reads() {
                cx.push(bio, &FlakeyFrame { down: 1 });
            }
        }
        bio.dev = self.dev.id;
        bio.sector += self.a.offset;
        MapResult::Remapped
    }

    fn end_io(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        let f: FlakeyFrame = bio.popped_ctx();
        if f.down == 1 && bio.status.is_ok() {
            self.corrupt_read(bio);
        }
        Endio::Done
    }

    fn frame_bytes(&self) -> usize {
        std::mem::size_of::<FlakeyFrame>()
    }

    /// Per reactor: the statuses of corrupted writes' children until their writes unpark.
    fn reactor_state(&self, _init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        self.a
            .corrupts_writes()
            .then(|| Box::new(WriteResults(Vec::with_capacity(256))) as Box<dyn Any + Send>)
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        cx.release(tag as u32);
        cx.state::<WriteResults>().0.push((tag, status));
        cx.unpark(tag);
    }

    /// A corrupted write's child is done: complete the write with its status.
    fn unparked(&self, _bio: &mut Bio, cx: &mut TargetCx<'_>, key: u64) -> MapResult {
        let r = &mut cx.state::<WriteResults>().0;
        let status = r
            .iter()
            .position(|x| x.0 == key)
            .map_or(Status::IoError, |i| r.swap_remove(i).1);
        MapResult::Done(status)
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        let c = child(self.dev.id);
        let mut l = Limits::TOP;
        l.stack(&c);
        l.check_alignment(&c, self.a.offset);
        if !(self.start * 512).is_multiple_of(c.logical_block_bytes as u64) {
            l.misaligned = true;
        }
        l
    }

    /// Plain data, not a device range: a copy through flakey is emulated as reads and writes,
    /// which see the intervals (a device range would let the copy bypass `map`).
    fn extent(&self, _offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Data { len }
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.dev.id]
    }

    fn args(&self) -> String {
        self.a.table_args(&self.dev.name)
    }

    /// dm-flakey's `STATUSTYPE_INFO` is empty.
    fn status(&self) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<FlakeyArgs, String> {
        let v: Vec<&str> = s.split_whitespace().collect();
        FlakeyArgs::parse(&v).map_err(|e| e.reason)
    }

    #[test]
    fn table_text_is_dms_canonical_form() {
        let cases = [
            ("d 0 1 1", "d 0 1 1 2 error_reads error_writes"),
            ("d 0 1 1 0", "d 0 1 1 2 error_reads error_writes"),
            ("d 8 3 2 1 DROP_WRITES", "d 8 3 2 1 drop_writes"),
            ("d 0 3 2 1 error_writes", "d 0 3 2 1 error_writes"),
            (
                "d 0 3 2 2 error_writes error_reads",
                "d 0 3 2 2 error_reads error_writes",
            ),
            (
                "d 0 0 5 5 corrupt_bio_byte 32 R 1 0",
                "d 0 0 5 5 corrupt_bio_byte 32 r 1 0",
            ),
            ("d 0 0 5 6 corrupt_bio_byte 224 w 0 32 drop_writes", ""),
            (
                "d 0 0 5 6 corrupt_bio_byte 224 w 0 32 error_reads",
                "d 0 0 5 6 error_reads corrupt_bio_byte 224 w 0 32",
            ),
            (
                "d 0 1 1 4 random_write_corrupt 100000000 random_read_corrupt 7",
                "d 0 1 1 4 random_read_corrupt 7 random_write_corrupt 100000000",
            ),
            // A disabled random corruption leaves no feature: dm's default applies.
            (
                "d 0 1 1 2 random_read_corrupt 0",
                "d 0 1 1 2 error_reads error_writes",
            ),
        ];
        for (line, want) in cases {
            match p(line) {
                Ok(a) => assert_eq!(a.table_args("d"), want, "{line}"),
                Err(e) => assert_eq!(want, "", "{line}: {e}"),
            }
        }
        let w = p("d 0 1 1 5 corrupt_bio_byte 1 w 9 0").unwrap();
        assert!(w.corrupts_writes());
        assert!(!p("d 0 1 1 5 corrupt_bio_byte 1 r 9 0")
            .unwrap()
            .corrupts_writes());
        assert!(p("d 0 1 1 2 random_write_corrupt 1")
            .unwrap()
            .corrupts_writes());
    }

    #[test]
    fn bad_lines_get_dms_errors() {
        let cases = [
            ("d 0 1", "Invalid argument count"),
            ("d x 1 1", "Invalid device sector"),
            ("d 0 -1 1", "Invalid up interval"),
            ("d 0 1 4294967296", "Invalid down interval"),
            ("d 0 0 0", "Total (up + down) interval is zero"),
            ("d 0 4294967295 1", "Interval overflow"),
            ("d 0 1 1 12", "Invalid number of feature args"),
            ("d 0 1 1 2 drop_writes", "Invalid number of feature args"),
            ("d 0 1 1 x", "Invalid number of feature args"),
            ("d 0 1 1 1 drop_writes junk", "1 argument(s) after the 1 feature argument(s)"),
            ("d 0 1 1 1 bogus", "Unrecognised flakey feature requested"),
            ("d 0 1 1 2 error_reads error_reads", "Feature error_reads duplicated"),
            ("d 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
            ("d 0 1 1 2 error_writes error_writes", "Feature error_writes duplicated"),
            (
                "d 0 1 1 2 error_writes drop_writes",
                "Feature drop_writes conflicts with feature error_writes",
            ),
            (
                "d 0 1 1 2 drop_writes error_writes",
                "Feature error_writes conflicts with feature drop_writes",
            ),
            ("d 0 1 1 4 corrupt_bio_byte 1 r 0", "Feature corrupt_bio_byte requires 4 parameters"),
            ("d 0 1 1 5 corrupt_bio_byte 0 r 0 0", "Invalid corrupt bio byte"),
            ("d 0 1 1 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction (r or w)"),
            (
                "d 0 1 1 5 corrupt_bio_byte 1 r 256 0",
                "Invalid corrupt value to write into bio byte (0-255)",
            ),
            ("d 0 1 1 5 corrupt_bio_byte 1 r 1 4294967296", "Invalid corrupt bio flags mask"),
            (
                "d 0 1 1 10 corrupt_bio_byte 1 r 1 0 corrupt_bio_byte 1 r 1 0",
                "Feature corrupt_bio_byte duplicated",
            ),
            ("d 0 1 1 1 random_read_corrupt", "Feature random_read_corrupt requires a parameter"),
            ("d 0 1 1 2 random_read_corrupt 1000000001", "Invalid random corrupt argument"),
            (
                "d 0 1 1 4 random_write_corrupt 1 random_write_corrupt 1",
                "Feature random_write_corrupt duplicated",
            ),
            (
                "d 0 1 1 3 drop_writes random_write_corrupt 1",
                "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
            ),
            (
                "d 0 1 1 6 error_writes corrupt_bio_byte 1 w 0 0",
                "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
            ),
            (
                "d 0 1 1 3 error_reads random_read_corrupt 5",
                "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(p(line).unwrap_err(), want, "{line}");
        }
    }

    /// Any mix of tokens is answered with a value or an error, never a panic.
    #[test]
    fn no_table_input_panics() {
        let toks = [
            "0",
            "1",
            "5",
            "11",
            "4294967295",
            "4294967296",
            "-1",
            "",
            "x",
            "r",
            "w",
            "corrupt_bio_byte",
            "random_read_corrupt",
            "random_write_corrupt",
            "error_reads",
            "drop_writes",
            "error_writes",
            "1000000000",
        ];
        let mut seed = 7u64;
        let mut oks = 0;
        // Miri runs the same check on fewer cases (it is ~1000x slower).
        let cases = if cfg!(miri) { 300 } else { 100_000usize };
        for n in 0..cases {
            let len = n % 14;
            let mut v = vec!["d"];
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.push(toks[(seed >> 33) as usize % toks.len()]);
            }
            if let Ok(a) = FlakeyArgs::parse(&v) {
                let again: Vec<String> = a.table_args("d").split(' ').map(String::from).collect();
                let again: Vec<&str> = again.iter().map(String::as_str).collect();
                assert_eq!(FlakeyArgs::parse(&again), Ok(a), "{v:?}");
                oks += 1;
            }
        }
        assert!(oks > cases / 1000, "{oks}");
    }

    #[test]
    fn intervals_count_whole_seconds_from_load() {
        let a = p("d 0 2 3").unwrap();
        let down: Vec<bool> = (0..11).map(|s| a.down_at(s)).collect();
        let f = false;
        let t = true;
        assert_eq!(down, [f, f, t, t, t, f, f, t, t, t, f]);
        assert!((0..10).all(|s| p("d 0 0 4").unwrap().down_at(s)));
        assert!((0..10).all(|s| !p("d 0 4 0").unwrap().down_at(s)));
        let big = p("d 0 4294967294 1").unwrap();
        assert!(big.down_at(4294967294) && !big.down_at(4294967295));
    }

    #[test]
    fn opf_is_linuxs() {
        assert_eq!(dm_opf(Op::Read, BioFlags::NONE), 0);
        assert_eq!(dm_opf(Op::Write, BioFlags::FUA), 1 | (1 << 17));
        assert_eq!(dm_opf(Op::Flush, BioFlags::NONE), 1 | (1 << 18));
        assert_eq!(
            dm_opf(Op::Read, BioFlags::NOWAIT | BioFlags::POLLED),
            (1 << 21) | (1 << 22)
        );
        assert_eq!(dm_opf(Op::WriteZeroes, BioFlags::NOMERGE), 9 | (1 << 14));
    }
}
