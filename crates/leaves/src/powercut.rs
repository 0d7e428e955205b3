//! `powercut`: a RAM leaf with a volatile write cache and a power switch, for crash-consistency
//! tests (DESIGN "Stateful targets" / "How we test", item 3).
//!
//! # Model
//!
//! The device holds two images: the **durable** image (what survives a power cut) and the
//! **current** image (what reads see: the cache over the durable image). Every write-like bio
//! (`Write`, `WriteZeroes`, `Discard`, `Copy`) updates the current image and is appended to an
//! ordered **log** of unflushed writes, `(sector, data)`; discard and write-zeroes log zeros
//! (a discarded range reads back as zeros, as on the `mem` leaf).
//!
//! - `Op::Flush` makes every logged write durable, in log order, and empties the log.
//! - `BioFlags::PREFLUSH` on a write does the same for everything *before* that write; the write
//!   itself then goes to the cache like any other.
//! - `BioFlags::FUA` makes that write itself durable when it completes. It stays in the log,
//!   marked forced, only while an older unflushed write overlaps it (so a cut that keeps the older
//!   write applies it *before* the forced one, never over it); otherwise it goes straight to the
//!   durable image.
//!
//! # The cut
//!
//! [`PowerCutLeaf::cut`] (or the `cut_after=N` / `cut_random=LO..HI` options, which cut right
//! after the N-th write was applied and acknowledged) turns the machine off: forced writes are
//! kept, and what survives of the unforced log is decided by a PRNG (splitmix64) seeded only by
//! `seed`, so the same seed and the same sequence of writes give the same image, byte for byte:
//!
//! - neither `tear` nor `reorder`: every unflushed write is lost;
//! - `tear` only: a prefix of the log persists, of a length drawn from `[0, n]`; the write just
//!   after the prefix (the one "in flight") persists a random subset of its sectors, the rest is
//!   lost;
//! - `reorder` only: each unflushed write independently persists whole or is lost (any subset);
//! - `tear` and `reorder`: each unflushed write is lost, persists whole, or is torn (a random
//!   subset of its sectors), one chance in three each.
//!
//! Persisting writes are applied in log order, so a sector always ends up holding either its
//! durable content or the data of one of the writes to it; a torn write is torn at sector
//! granularity (each sector is all-old or all-new). After the cut every I/O completes with
//! `Status::IoError` ("the machine is off"); [`PowerCutLeaf::durable_image`] or
//! [`PowerCutLeaf::save_durable`] take the surviving image, and [`PowerCutLeaf::from_image`] /
//! [`PowerCutLeaf::load`] "reboot" it into a new leaf.
//!
//! # A test-only device: one lock on the data path
//!
//! This leaf is for tests. Its state sits behind one `Mutex` that every reactor channel takes
//! for each bio, so the events reaching it are totally ordered (deterministic when the
//! submissions are: an inline engine, or one reactor). That breaks the rule that the data path
//! takes no locks, which holds for production paths only; never use this leaf for speed. Writes
//! also allocate (the log keeps a copy of each write's data until the next flush or the cut), so
//! the log grows without bound while nothing flushes.

use stackbd_core::{
    Bio, BioFlags, BioId, Leaf, LeafChannel, LeafCx, Limits, Op, Sector, Status, SECTOR_SIZE,
};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const SS: u64 = SECTOR_SIZE as u64;
/// Stream constants: the cut decisions and the random cut point draw from different streams of
/// the same seed, so neither shifts the other.
const CUT_STREAM: u64 = 0x6375_745f_6661_7465; // "cut_fate"
const POINT_STREAM: u64 = 0x6375_745f_706f_696e; // "cut_poin"

/// splitmix64: small, fast, and the same on every machine.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(seed ^ stream)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// How a power-cut leaf behaves; see the module docs. Printed by `Display` as the option part of
/// [`Leaf::args`] (`seed=7 tear reorder cut_after=100`) and parsed back by
/// [`PowerCutLeaf::parse_args`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCutOptions {
    /// Seeds every random decision (which writes survive, where a random cut falls).
    pub seed: u64,
    /// A surviving write may persist only some of its sectors.
    pub tear: bool,
    /// Any subset of the unflushed writes may persist, not only a prefix of the log.
    pub reorder: bool,
    /// Cut right after the N-th write (counting write, write-zeroes, discard and copy bios); 0
    /// cuts before any I/O.
    pub cut_after: Option<u64>,
    /// Cut right after the N-th write, N drawn from `[lo, hi]` (inclusive) by the seed. With
    /// `cut_after` too, the earlier of the two points wins.
    pub cut_random: Option<(u64, u64)>,
}

impl fmt::Display for PowerCutOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        if self.tear {
            f.write_str(" tear")?;
        }
        if self.reorder {
            f.write_str(" reorder")?;
        }
        if let Some(n) = self.cut_after {
            write!(f, " cut_after={n}")?;
        }
        if let Some((lo, hi)) = self.cut_random {
            write!(f, " cut_random={lo}..{hi}")?;
        }
        Ok(())
    }
}

/// Counters of a power-cut leaf, for test reports ([`PowerCutLeaf::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCutStats {
    /// Write-like bios accepted (write, write-zeroes, discard, copy), FUA ones included.
    pub writes: u64,
    /// Of those, writes with FUA.
    pub fua_writes: u64,
    /// Flushes done: `Op::Flush` bios and writes with PREFLUSH.
    pub flushes: u64,
    /// Reads served (from the current image).
    pub reads: u64,
    /// I/O refused because the power was off.
    pub failed_after_cut: u64,
    /// `writes` when the power was cut; `None` while it is on.
    pub cut_at_write: Option<u64>,
    /// Unflushed, non-FUA writes in the cache at the cut.
    pub unflushed_at_cut: u64,
    /// Of those, writes that persisted whole.
    pub persisted_at_cut: u64,
    /// Of those, writes of which no sector persisted.
    pub lost_at_cut: u64,
    /// Of those, writes of which some sectors persisted and some did not.
    pub torn_at_cut: u64,
}

/// What one logged write wrote.
enum Payload {
    Data(Box<[u8]>),
    /// Discard and write-zeroes.
    Zeroes,
}

/// One unflushed write.
struct Entry {
    sector: u64,
    sectors: u64,
    payload: Payload,
    /// FUA: durable already; kept in the log only to be applied in its place.
    forced: bool,
}

impl Entry {
    fn overlaps(&self, sector: u64, sectors: u64) -> bool {
        self.sector < sector.saturating_add(sectors)
            && sector < self.sector.saturating_add(self.sectors)
    }

    /// Writes sectors `[first, first + n)` of this entry (relative to its start) into `img`.
    /// Ranges were checked against the device when the entry was logged; a range that does not
    /// fit anyway is skipped rather than panicking.
    fn apply(&self, img: &mut [u8], first: u64, n: u64) {
        let (Some(start), Some(len)) = (
            self.sector
                .checked_add(first)
                .and_then(|s| s.checked_mul(SS)),
            n.checked_mul(SS).and_then(|l| usize::try_from(l).ok()),
        ) else {
            return;
        };
        let Ok(start) = usize::try_from(start) else {
            return;
        };
        let Some(dst) = start
            .checked_add(len)
            .and_then(|end| img.get_mut(start..end))
        else {
            return;
        };
        match &self.payload {
            Payload::Data(d) => {
                let from =
                    usize::try_from(first).map_or(usize::MAX, |f| f.saturating_mul(SECTOR_SIZE));
                if let Some(src) = from.checked_add(len).and_then(|end| d.get(from..end)) {
                    dst.copy_from_slice(src);
                }
            }
            Payload::Zeroes => dst.fill(0),
        }
    }

    fn apply_all(&self, img: &mut [u8]) {
        self.apply(img, 0, self.sectors);
    }
}

struct State {
    size_bytes: u64,
    opts: PowerCutOptions,
    /// The resolved cut point (`cut_after` and `cut_random`, the earlier).
    cut_point: Option<u64>,
    durable: Vec<u8>,
    /// What reads see; emptied at the cut.
    current: Vec<u8>,
    log: Vec<Entry>,
    cut: bool,
    stats: PowerCutStats,
}

impl State {
    /// Byte range of `[sector, sector + sectors)` if it lies inside the device.
    fn range(&self, sector: u64, sectors: u64) -> Option<(usize, usize)> {
        let off = sector.checked_mul(SS)?;
        let end = off.checked_add(sectors.checked_mul(SS)?)?;
        (end <= self.size_bytes).then_some((usize::try_from(off).ok()?, usize::try_from(end).ok()?))
    }

    fn flush(&mut self) {
        self.stats.flushes += 1;
        for e in std::mem::take(&mut self.log) {
            e.apply_all(&mut self.durable);
        }
    }

    fn submit(&mut self, bio: &mut Bio) -> Status {
        if self.cut {
            self.stats.failed_after_cut += 1;
            return Status::IoError;
        }
        if bio.op == Op::Flush {
            self.flush();
            return Status::Ok;
        }
        let sectors = u64::from(bio.sectors);
        let Some((off, end)) = self.range(bio.sector, sectors) else {
            return Status::OutOfRange;
        };
        if bio.op.has_data() && bio.data.len() != end - off {
            return Status::Invalid;
        }
        let payload = match bio.op {
            Op::Read => {
                self.stats.reads += 1;
                bio.data.write_from(0, &self.current[off..end]);
                return Status::Ok;
            }
            Op::Write => {
                let mut d = vec![0u8; end - off].into_boxed_slice();
                bio.data.read_into(0, &mut d);
                Payload::Data(d)
            }
            Op::Copy => match self.range(bio.copy_src, sectors) {
                Some((s, e)) => Payload::Data(self.current[s..e].into()),
                None => return Status::OutOfRange,
            },
            Op::Discard | Op::WriteZeroes => Payload::Zeroes,
            // Handled above.
            Op::Flush => return Status::Ok,
        };
        if bio.flags.contains(BioFlags::PREFLUSH) {
            self.flush();
        }
        let forced = bio.flags.contains(BioFlags::FUA);
        let e = Entry {
            sector: bio.sector,
            sectors,
            payload,
            forced,
        };
        e.apply_all(&mut self.current);
        self.stats.writes += 1;
        if forced {
            self.stats.fua_writes += 1;
            let covered = self
                .log
                .iter()
                .any(|o| !o.forced && o.overlaps(e.sector, e.sectors));
            if covered {
                self.log.push(e);
            } else {
                e.apply_all(&mut self.durable);
            }
        } else {
            self.log.push(e);
        }
        if self.cut_point == Some(self.stats.writes) {
            self.cut();
        }
        Status::Ok
    }

    /// Turns the power off: decides what survives of the log (module docs) and applies it.
    fn cut(&mut self) -> bool {
        if self.cut {
            return false;
        }
        self.cut = true;
        self.current = Vec::new();
        let PowerCutOptions { tear, reorder, .. } = self.opts;
        let mut rng = Rng::new(self.opts.seed, CUT_STREAM);
        let log = std::mem::take(&mut self.log);
        let unforced = log.iter().filter(|e| !e.forced).count() as u64;
        let prefix = if tear && !reorder {
            rng.below(unforced + 1)
        } else {
            0
        };
        let st = &mut self.stats;
        st.cut_at_write = Some(st.writes);
        st.unflushed_at_cut = unforced;
        let mut i = 0u64;
        for e in &log {
            if e.forced {
                e.apply_all(&mut self.durable);
                continue;
            }
            // 0 lost, 1 whole, 2 torn.
            let fate = match (tear, reorder) {
                (false, false) => 0,
                (false, true) => rng.below(2),
                (true, true) => rng.below(3),
                (true, false) if i < prefix => 1,
                (true, false) if i == prefix => 2,
                (true, false) => 0,
            };
            i += 1;
            let kept = match fate {
                0 => 0,
                1 => {
                    e.apply_all(&mut self.durable);
                    e.sectors
                }
                _ => {
                    // Each sector persists or not; runs of kept sectors are applied together.
                    let (mut kept, mut run) = (0u64, None::<u64>);
                    for s in 0..e.sectors {
                        let keep = rng.below(2) == 1;
                        match (keep, run) {
                            (true, None) => run = Some(s),
                            (false, Some(r)) => {
                                e.apply(&mut self.durable, r, s - r);
                                run = None;
                            }
                            _ => {}
                        }
                        kept += u64::from(keep);
                    }
                    if let Some(r) = run {
                        e.apply(&mut self.durable, r, e.sectors - r);
                    }
                    kept
                }
            };
            if kept == 0 {
                st.lost_at_cut += 1;
            } else if kept == e.sectors {
                st.persisted_at_cut += 1;
            } else {
                st.torn_at_cut += 1;
            }
        }
        true
    }

    /// The image that survives a cut for sure: durable plus the forced writes still logged.
    fn durable_now(&self) -> Vec<u8> {
        let mut img = self.durable.clone();
        for e in self.log.iter().filter(|e| e.forced) {
            e.apply_all(&mut img);
        }
        img
    }
}

/// The power-cut leaf. Clones share the device (keep one in the test, hand one to the engine).
#[derive(Clone)]
pub struct PowerCutLeaf {
    state: Arc<Mutex<State>>,
    size_bytes: u64,
    opts: PowerCutOptions,
}

impl fmt::Debug for PowerCutLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PowerCutLeaf")
            .field("size_bytes", &self.size_bytes)
            .field("opts", &self.opts)
            .finish()
    }
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.into())
}

/// `1GiB`-style text for a byte count: the largest binary unit that divides it, else bytes.
fn fmt_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses `4096`, `512B`, `64K`, `64KiB`, `1G`, `1GiB` (binary units, like the config's sizes).
fn parse_size(t: &str) -> Result<u64, String> {
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let shift = match unit {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => {
            return Err(format!(
                "bad size '{t}': expected bytes or K/KiB, M/MiB, G/GiB, T/TiB"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("bad size '{t}'"))
}

impl PowerCutLeaf {
    /// A zeroed device of `size_bytes` (rounded down to whole sectors). Control path or test
    /// thread; allocates both images (zero pages, committed as they are written). Refuses a
    /// `cut_random` range with `lo > hi`. `cut_after=0` gives a device that is off from the start.
    pub fn new(size_bytes: u64, opts: PowerCutOptions) -> std::io::Result<PowerCutLeaf> {
        let size_bytes = size_bytes / SS * SS;
        let len = usize::try_from(size_bytes)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(|| invalid("size too large"))?;
        PowerCutLeaf::with_image(vec![0u8; len], opts)
    }

    /// The "reboot": a new device, powered on with an empty cache, whose durable (and current)
    /// content is `image`, whose length must be a whole number of sectors. Control path or test
    /// thread; allocates a second copy for the current image.
    pub fn from_image(image: Vec<u8>, opts: PowerCutOptions) -> std::io::Result<PowerCutLeaf> {
        if !image.len().is_multiple_of(SECTOR_SIZE) {
            return Err(invalid("image length is not a whole number of sectors"));
        }
        PowerCutLeaf::with_image(image, opts)
    }

    /// [`PowerCutLeaf::from_image`] from a file written by [`PowerCutLeaf::save_durable`]. Blocks
    /// on the file read; never call it on a reactor.
    pub fn load(path: &Path, opts: PowerCutOptions) -> std::io::Result<PowerCutLeaf> {
        PowerCutLeaf::from_image(std::fs::read(path)?, opts)
    }

    fn with_image(image: Vec<u8>, opts: PowerCutOptions) -> std::io::Result<PowerCutLeaf> {
        let mut points = opts.cut_after.into_iter().collect::<Vec<_>>();
        if let Some((lo, hi)) = opts.cut_random {
            if lo > hi {
                return Err(invalid("cut_random: lo > hi"));
            }
            let span = (hi - lo).saturating_add(1);
            points.push(lo + Rng::new(opts.seed, POINT_STREAM).below(span));
        }
        let size_bytes = image.len() as u64;
        let mut st = State {
            size_bytes,
            opts,
            cut_point: points.into_iter().min(),
            current: image.clone(),
            durable: image,
            log: Vec::new(),
            cut: false,
            stats: PowerCutStats::default(),
        };
        if st.cut_point == Some(0) {
            st.cut();
        }
        Ok(PowerCutLeaf {
            state: Arc::new(Mutex::new(st)),
            size_bytes,
            opts,
        })
    }

    /// Parses a declaration as [`Leaf::args`] prints it: a size (`1GiB`, `65536`), then
    /// `seed=N`, `tear`, `reorder`, `cut_after=N`, `cut_random=LO..HI` in any order. Pure.
    pub fn parse_args(args: &str) -> Result<(u64, PowerCutOptions), String> {
        let mut words = args.split_whitespace();
        let size = parse_size(words.next().ok_or("missing size")?)?;
        if !size.is_multiple_of(SS) {
            return Err(format!("size {size} is not a whole number of sectors"));
        }
        let num = |k: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{k}: '{v}' is not a number"))
        };
        let mut o = PowerCutOptions::default();
        for w in words {
            match w.split_once('=') {
                None if w == "tear" => o.tear = true,
                None if w == "reorder" => o.reorder = true,
                Some(("seed", v)) => o.seed = num("seed", v)?,
                Some(("cut_after", v)) => o.cut_after = Some(num("cut_after", v)?),
                Some(("cut_random", v)) => {
                    let (lo, hi) = v
                        .split_once("..")
                        .ok_or_else(|| format!("cut_random: '{v}' is not LO..HI"))?;
                    let (lo, hi) = (num("cut_random", lo)?, num("cut_random", hi)?);
                    if lo > hi {
                        return Err(format!("cut_random: {lo} > {hi}"));
                    }
                    o.cut_random = Some((lo, hi));
                }
                _ => return Err(format!("unknown powercut option '{w}'")),
            }
        }
        Ok((size, o))
    }

    /// [`PowerCutLeaf::parse_args`] then [`PowerCutLeaf::new`]. Control path.
    pub fn from_args(args: &str) -> Result<PowerCutLeaf, String> {
        let (size, opts) = PowerCutLeaf::parse_args(args)?;
        PowerCutLeaf::new(size, opts).map_err(|e| e.to_string())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent state (no partial
        // updates that matter to a test), so a poisoned lock is taken as is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The options the leaf was made with. Any thread; no lock, no allocation.
    pub fn options(&self) -> PowerCutOptions {
        self.opts
    }

    /// Cuts the power now (see the module docs). Returns false if it was already off. Any
    /// thread (the control socket, a test); takes the device lock, so it waits for the bio a
    /// reactor is running, and its decisions depend only on the seed and the log.
    pub fn cut(&self) -> bool {
        self.lock().cut()
    }

    /// True once the power is off. Any thread; takes the device lock briefly.
    pub fn is_cut(&self) -> bool {
        self.lock().cut
    }

    /// The write count after which the leaf cuts by itself (`cut_after` / `cut_random`,
    /// resolved from the seed), if any. Any thread; takes the device lock briefly.
    pub fn cut_point(&self) -> Option<u64> {
        self.lock().cut_point
    }

    /// The durable image: after a cut, what survived; before, what is durable for sure
    /// (flushed and FUA writes). Any thread; copies the whole device (allocates its size).
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable_now()
    }

    /// Writes [`PowerCutLeaf::durable_image`] to `path` (created or truncated). Blocks on the
    /// file; never call it on a reactor.
    pub fn save_durable(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.durable_image())
    }

    /// The counters. Any thread; takes the device lock briefly.
    pub fn stats(&self) -> PowerCutStats {
        self.lock().stats
    }
}

impl Leaf for PowerCutLeaf {
    fn kind(&self) -> &'static str {
        "powercut"
    }

    fn size(&self) -> Sector {
        self.size_bytes / SS
    }

    /// As the `mem` leaf's, except that the physical block is one sector: a cut tears writes at
    /// sector granularity, so no larger unit is atomic.
    fn limits(&self) -> Limits {
        Limits {
            io_min_bytes: crate::PAGE_BYTES as u32,
            max_copy_sectors: u32::MAX,
            copy_native: true,
            ..Limits::TOP
        }
    }

    fn args(&self) -> String {
        format!("{} {}", fmt_size(self.size_bytes), self.opts)
    }

    fn channel(&self) -> Box<dyn LeafChannel> {
        Box::new(PowerCutChannel {
            state: self.state.clone(),
        })
    }

    /// A flush (daemon shutdown). Fails once the power is off.
    fn sync(&self) -> std::io::Result<()> {
        let mut st = self.lock();
        if st.cut {
            return Err(std::io::Error::other("powercut: the power is off"));
        }
        st.flush();
        Ok(())
    }

    /// `cut` (turn the power off now), `save PATH` (write the durable image to the absolute
    /// `PATH`: after a cut what survived, before one what is durable for sure), `stats` (the
    /// counters on one line). Control thread; takes the device lock, `save` writes the file.
    fn message(&self, argv: &[&str]) -> Result<String, String> {
        match argv {
            ["cut"] => {
                if !self.cut() {
                    return Err(format!(
                        "cut: the power is already off (cut after write {})",
                        self.stats().cut_at_write.unwrap_or(0)
                    ));
                }
                let s = self.stats();
                Ok(format!(
                    "cut: {} unflushed writes, {} persisted, {} lost, {} torn",
                    s.unflushed_at_cut, s.persisted_at_cut, s.lost_at_cut, s.torn_at_cut
                ))
            }
            ["save", path] => {
                let p = Path::new(path);
                if !p.is_absolute() {
                    return Err(format!(
                        "save: '{path}' is relative; the daemon needs an absolute path"
                    ));
                }
                // One lock for the state and the image, so a cut cannot fall in between.
                let (cut, img) = {
                    let st = self.lock();
                    (st.cut, st.durable_now())
                };
                std::fs::write(p, &img).map_err(|e| format!("save: {path}: {e}"))?;
                let what = if cut {
                    "the image that survived the cut"
                } else {
                    "the durable image (the power is still on: flushed and FUA writes only)"
                };
                Ok(format!("saved {what}: {} bytes to {path}", img.len()))
            }
            ["stats"] => {
                let s = self.stats();
                let cut_at = s.cut_at_write.map_or("-".to_string(), |n| n.to_string());
                Ok(format!(
                    "power={} writes={} fua_writes={} flushes={} reads={} failed_after_cut={} \
                     cut_at_write={cut_at} unflushed_at_cut={} persisted_at_cut={} \
                     lost_at_cut={} torn_at_cut={}",
                    if s.cut_at_write.is_some() {
                        "off"
                    } else {
                        "on"
                    },
                    s.writes,
                    s.fua_writes,
                    s.flushes,
                    s.reads,
                    s.failed_after_cut,
                    s.unflushed_at_cut,
                    s.persisted_at_cut,
                    s.lost_at_cut,
                    s.torn_at_cut
                ))
            }
            [] => Err("no message (powercut leaves take: cut, save PATH, stats)".into()),
            [verb @ ("cut" | "save" | "stats"), ..] => Err(format!(
                "{verb}: wrong arguments (powercut leaves take: cut, save PATH, stats)"
            )),
            [verb, ..] => Err(format!(
                "unknown message '{verb}' (powercut leaves take: cut, save PATH, stats)"
            )),
        }
    }
}

/// A reactor's channel: every bio takes the device lock (module docs), runs to the end under
/// it, and completes through `cx.complete`.
struct PowerCutChannel {
    state: Arc<Mutex<State>>,
}

impl LeafChannel for PowerCutChannel {
    fn submit(&mut self, cx: &mut LeafCx<'_>, id: BioId) {
        let status = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.submit(cx.bio(id))
        };
        cx.complete(id, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_fixed_and_below_stays_in_range() {
        // splitmix64's published first output for seed 0.
        assert_eq!(Rng::new(0, 0).next(), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(7, 0);
        assert!((0..1000).all(|_| r.below(5) < 5));
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn sizes_print_and_parse() {
        assert_eq!(fmt_size(1 << 30), "1GiB");
        assert_eq!(fmt_size(3 << 19), "1536KiB");
        assert_eq!(fmt_size(512), "512");
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert!(parse_size("1GB").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
