//! The MD write-intent bitmap as `drivers/md/md-bitmap.{c,h}` keeps it on disk (internal bitmap,
//! version 4 = `BITMAP_MAJOR_HI`), at byte 4096 of each leg's metadata device: a 256-byte
//! superblock, then one bit per region ("chunk"), bit `n` in byte `n / 8` at `1 << (n % 8)`.
//! Pure code: no I/O, any thread; encoders write into caller buffers and allocate nothing.
//!
//! Superblock byte offsets (from `bitmap_super_t`): `0 magic u32 ("bitm"), 4 version u32,
//! 8 uuid [u8; 16], 24 events u64, 32 events_cleared u64, 40 sync_size u64 (sectors),
//! 48 state u32, 52 chunksize u32 (bytes), 56 daemon_sleep u32 (seconds), 60 write_behind u32,
//! 64 sectors_reserved u32, 68 nodes u32, 72 cluster_name [u8; 64]`, zero to 256.

use std::fmt;

/// `BITMAP_MAGIC`.
pub const BITMAP_MAGIC: u32 = 0x6d74_6962;
/// `BITMAP_MAJOR_HI`: bits in little-endian order (what new bitmaps get).
pub const BITMAP_VERSION: u32 = 4;
/// Oldest version read (`BITMAP_MAJOR_LO`).
pub const BITMAP_VERSION_LO: u32 = 3;
/// Bytes of the bitmap superblock; the bits follow it.
pub const BITMAP_SB_BYTES: usize = 256;
/// Byte offset of the bitmap on the metadata device (dm-raid puts it at 4 KiB).
pub const BITMAP_OFFSET: u64 = 4096;
/// `BITMAP_STALE` state bit: the bitmap cannot be trusted (resync everything).
pub const STATE_STALE: u32 = 1;
/// The kernel's bound on `write_behind` (`COUNTER_MAX`).
pub const MAX_WRITE_BEHIND: u32 = 16383;
/// Regions stackbd accepts (bounds the bitmap to 2 MiB + 256 bytes).
pub const MAX_CHUNKS: u64 = 1 << 24;

/// The bitmap superblock, decoded. Plain data owned by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapSuper {
    /// `version`, as the kernel's on-disk struct names it.
    pub version: u32,
    /// `uuid`, as the kernel's on-disk struct names it.
    pub uuid: [u8; 16],
    /// `events`, as the kernel's on-disk struct names it.
    pub events: u64,
    /// `events_cleared`, as the kernel's on-disk struct names it.
    pub events_cleared: u64,
    /// Sectors the bitmap covers (the leg's data size).
    pub sync_size: u64,
    /// `state`, as the kernel's on-disk struct names it.
    pub state: u32,
    /// Bytes per region; a power of two, at least 512.
    pub chunksize: u32,
    /// Seconds between runs of the clearing daemon.
    pub daemon_sleep: u32,
    /// `write_behind`, as the kernel's on-disk struct names it.
    pub write_behind: u32,
    /// `sectors_reserved`, as the kernel's on-disk struct names it.
    pub sectors_reserved: u32,
    /// `nodes`, as the kernel's on-disk struct names it.
    pub nodes: u32,
}

/// Why a bitmap was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapError {
    /// The buffer is shorter than needed.
    Short {
        /// Bytes given.
        have: usize,
        /// Bytes needed.
        need: u64,
    },
    /// Not `BITMAP_MAGIC`.
    BadMagic(u32),
    /// A version other than 3 or 4.
    BadVersion(u32),
    /// A field out of range (name, value).
    Field(&'static str, u64),
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapError::Short { have, need } => write!(f, "bitmap: {have} bytes, need {need}"),
            BitmapError::BadMagic(m) => write!(f, "bitmap: magic {m:#010x} is not 'bitm'"),
            BitmapError::BadVersion(v) => write!(f, "bitmap: version {v} unsupported (3 or 4)"),
            BitmapError::Field(n, v) => write!(f, "bitmap: {n} = {v} is out of range"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl BitmapSuper {
    /// Regions covered: `ceil(sync_size / chunk sectors)`, checked.
    pub fn chunks(&self) -> Result<u64, BitmapError> {
        if self.chunksize < 512 || !self.chunksize.is_power_of_two() {
            return Err(BitmapError::Field("chunksize", self.chunksize.into()));
        }
        let per = u64::from(self.chunksize / 512);
        let n = self.sync_size.div_ceil(per);
        if n > MAX_CHUNKS {
            return Err(BitmapError::Field("sync_size", self.sync_size));
        }
        Ok(n)
    }

    /// Bytes of superblock + bits, rounded up to whole sectors.
    pub fn total_bytes(&self) -> Result<usize, BitmapError> {
        let n = self.chunks()?;
        Ok((BITMAP_SB_BYTES as u64 + n.div_ceil(8)).next_multiple_of(512) as usize)
    }

    /// Writes the superblock into `out[..256]`.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), BitmapError> {
        if out.len() < BITMAP_SB_BYTES {
            return Err(BitmapError::Short {
                have: out.len(),
                need: BITMAP_SB_BYTES as u64,
            });
        }
        let o = &mut out[..BITMAP_SB_BYTES];
        o.fill(0);
        let put32 =
            |o: &mut [u8], at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |o: &mut [u8], at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put32(o, 0, BITMAP_MAGIC);
        put32(o, 4, self.version);
        o[8..24].copy_from_slice(&self.uuid);
        put64(o, 24, self.events);
        put64(o, 32, self.events_cleared);
        put64(o, 40, self.sync_size);
        put32(o, 48, self.state);
        put32(o, 52, self.chunksize);
        put32(o, 56, self.daemon_sleep);
        put32(o, 60, self.write_behind);
        put32(o, 64, self.sectors_reserved);
        put32(o, 68, self.nodes);
        Ok(())
    }

    /// Reads and checks a bitmap superblock (magic, version, chunk size, write-behind, size).
    pub fn decode(b: &[u8]) -> Result<BitmapSuper, BitmapError> {
        if b.len() < BITMAP_SB_BYTES {
            return Err(BitmapError::Short {
                have: b.len(),
                need: BITMAP_SB_BYTES as u64,
            });
        }
        let magic = u32_at(b, 0);
        if magic != BITMAP_MAGIC {
            return Err(BitmapError::BadMagic(magic));
        }
        let version = u32_at(b, 4);
        if !(BITMAP_VERSION_LO..=BITMAP_VERSION).contains(&version) {
            return Err(BitmapError::BadVersion(version));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        let s = BitmapSuper {
            version,
            uuid,
            events: u64_at(b, 24),
            events_cleared: u64_at(b, 32),
            sync_size: u64_at(b, 40),
            state: u32_at(b, 48),
            chunksize: u32_at(b, 52),
            daemon_sleep: u32_at(b, 56),
            write_behind: u32_at(b, 60),
            sectors_reserved: u32_at(b, 64),
            nodes: u32_at(b, 68),
        };
        s.chunks()?;
        if s.write_behind > MAX_WRITE_BEHIND {
            return Err(BitmapError::Field("write_behind", s.write_behind.into()));
        }
        if s.events_cleared > s.events {
            return Err(BitmapError::Field("events_cleared", s.events_cleared));
        }
        Ok(s)
    }
}

/// Bit `n` of the bits that follow the superblock in `area` (superblock + bits). Out of range
/// reads as clear.
pub fn bit(area: &[u8], n: u64) -> bool {
    let Some(at) = usize::try_from(n / 8)
        .ok()
        .and_then(|i| i.checked_add(BITMAP_SB_BYTES))
    else {
        return false;
    };
    area.get(at).is_some_and(|b| b & (1 << (n % 8)) != 0)
}

/// Sets or clears bit `n` in `area`; false if it lies outside.
pub fn set_bit(area: &mut [u8], n: u64, on: bool) -> bool {
    let Some(at) = usize::try_from(n / 8)
        .ok()
        .and_then(|i| i.checked_add(BITMAP_SB_BYTES))
    else {
        return false;
    };
    match area.get_mut(at) {
        Some(b) => {
            if on {
                *b |= 1 << (n % 8)
            } else {
                *b &= !(1 << (n % 8))
            }
            true
        }
        None => false,
    }
}

/// Dirty bits among the first `chunks` of `area`.
pub fn count_dirty(area: &[u8], chunks: u64) -> u64 {
    (0..chunks).filter(|&n| bit(area, n)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sample() -> BitmapSuper {
        BitmapSuper {
            version: BITMAP_VERSION,
            events: 7,
            events_cleared: 3,
            sync_size: 8192,
            chunksize: 64 * 1024,
            daemon_sleep: 5,
            ..BitmapSuper::default()
        }
    }

    #[test]
    fn round_trip_and_bits() {
        let s = sample();
        assert_eq!(s.chunks(), Ok(64));
        let mut area = vec![0xFFu8; s.total_bytes().unwrap()];
        assert_eq!(area.len(), 512);
        s.encode(&mut area).unwrap();
        area[BITMAP_SB_BYTES..].fill(0);
        assert_eq!(&area[0..4], b"bitm");
        assert_eq!(BitmapSuper::decode(&area), Ok(s));
        assert!(set_bit(&mut area, 9, true));
        assert_eq!(area[BITMAP_SB_BYTES + 1], 2);
        assert!(bit(&area, 9) && !bit(&area, 8));
        assert_eq!(count_dirty(&area, 64), 1);
        assert!(!set_bit(&mut area, 1 << 40, true));
        assert!(!bit(&area, u64::MAX));
    }

    #[test]
    fn refuses_bad_input() {
        let s = sample();
        let mut b = [0u8; 256];
        assert!(matches!(
            BitmapSuper::decode(&b[..3]),
            Err(BitmapError::Short { .. })
        ));
        assert!(matches!(
            BitmapSuper::decode(&b),
            Err(BitmapError::BadMagic(0))
        ));
        for (f, v) in [(52, 1000u32), (52, 0), (4, 9), (60, 20000)] {
            s.encode(&mut b).unwrap();
            b[f..f + 4].copy_from_slice(&v.to_le_bytes());
            assert!(
                BitmapSuper::decode(&b).is_err(),
                "field at {f} = {v} accepted"
            );
        }
        s.encode(&mut b).unwrap();
        b[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            BitmapSuper::decode(&b),
            Err(BitmapError::Field("sync_size", _))
        ));
    }
}
