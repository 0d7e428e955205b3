//! dm-raid's per-leg superblock ("DmRd"), as `drivers/md/dm-raid.c` lays it out at sector 0 of
//! each leg's metadata device: little-endian, packed, the 1.9.0 extended layout (compat feature
//! bit 0 set), zero up to the end of the 512-byte sector. Pure code: no I/O, callable from any
//! thread; `encode` writes into a caller's buffer and allocates nothing.
//!
//! Byte offsets (from the kernel's struct definition):
//! `0 magic u32, 4 compat_features u32, 8 num_devices u32, 12 array_position u32, 16 events u64,
//! 24 failed_devices u64, 32 disk_recovery_offset u64, 40 array_resync_offset u64, 48 level u32,
//! 52 layout u32, 56 stripe_sectors u32, 60 flags u32, 64 reshape_position u64, 72 new_level u32,
//! 76 new_layout u32, 80 new_stripe_sectors u32, 84 delta_disks u32, 88 array_sectors u64,
//! 96 data_offset u64, 104 new_data_offset u64, 112 sectors u64,
//! 120 extended_failed_devices [u64; 3], 144 incompat_features u32` (148 bytes).

use std::fmt;

/// "DmRd" as the kernel's `DM_RAID_MAGIC` (stored little-endian).
pub const DM_RAID_MAGIC: u32 = 0x6452_6D44;
/// `FEATURE_FLAG_SUPPORTS_V190`: the extended fields (flags ... incompat_features) are valid.
pub const FEATURE_V190: u32 = 1;
/// Bytes of the struct; the rest of the sector is zero.
pub const SB_STRUCT_BYTES: usize = 148;
/// Bytes stackbd writes and reads (one sector).
pub const SB_BYTES: usize = 512;
/// Devices the failed bitmaps can name (the kernel's limit is 253 in a 256-bit field).
pub const MAX_DEVICES: u32 = 253;
/// MD's level number for raid1.
pub const LEVEL_RAID1: u32 = 1;

/// One leg's superblock, decoded. Plain data owned by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Superblock {
    /// `compat_features`, as the kernel's on-disk struct names it.
    pub compat_features: u32,
    /// `num_devices`, as the kernel's on-disk struct names it.
    pub num_devices: u32,
    /// `array_position`, as the kernel's on-disk struct names it.
    pub array_position: u32,
    /// Raised on every superblock update; the leg with the highest count is the freshest.
    pub events: u64,
    /// Bit `i` set: device `i` failed (256 bits: the legacy word then the three extended).
    pub failed: [u64; 4],
    /// How far this leg's rebuild got (sectors); `u64::MAX` when the leg is in sync.
    pub disk_recovery_offset: u64,
    /// How far the array's resync got (sectors); `u64::MAX` when done.
    pub array_resync_offset: u64,
    /// `level`, as the kernel's on-disk struct names it.
    pub level: u32,
    /// `layout`, as the kernel's on-disk struct names it.
    pub layout: u32,
    /// `stripe_sectors`, as the kernel's on-disk struct names it.
    pub stripe_sectors: u32,
    /// `flags`, as the kernel's on-disk struct names it.
    pub flags: u32,
    /// `reshape_position`, as the kernel's on-disk struct names it.
    pub reshape_position: u64,
    /// `new_level`, as the kernel's on-disk struct names it.
    pub new_level: u32,
    /// `new_layout`, as the kernel's on-disk struct names it.
    pub new_layout: u32,
    /// `new_stripe_sectors`, as the kernel's on-disk struct names it.
    pub new_stripe_sectors: u32,
    /// `delta_disks`, as the kernel's on-disk struct names it.
    pub delta_disks: u32,
    /// `array_sectors`, as the kernel's on-disk struct names it.
    pub array_sectors: u64,
    /// `data_offset`, as the kernel's on-disk struct names it.
    pub data_offset: u64,
    /// `new_data_offset`, as the kernel's on-disk struct names it.
    pub new_data_offset: u64,
    /// Used device size in sectors.
    pub sectors: u64,
    /// `incompat_features`, as the kernel's on-disk struct names it.
    pub incompat_features: u32,
}

/// Why a superblock was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SbError {
    /// Fewer bytes than one superblock.
    Short(usize),
    /// Not "DmRd": a blank or foreign metadata device.
    BadMagic(u32),
    /// A field out of range (name, value).
    Field(&'static str, u64),
    /// Incompatible features stackbd does not know.
    Incompat(u32),
}

impl fmt::Display for SbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SbError::Short(n) => write!(f, "superblock: {n} bytes, need {SB_STRUCT_BYTES}"),
            SbError::BadMagic(m) => write!(f, "superblock: magic {m:#010x} is not DmRd"),
            SbError::Field(n, v) => write!(f, "superblock: {n} = {v} is out of range"),
            SbError::Incompat(v) => write!(f, "superblock: unknown incompat features {v:#x}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Superblock {
    /// True if device `i` is marked failed.
    pub fn is_failed(&self, i: u32) -> bool {
        i < 256 && self.failed[(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }

    /// Marks or clears device `i` failed; indices past 255 are ignored (refused at parse).
    pub fn set_failed(&mut self, i: u32, on: bool) {
        if i < 256 {
            let bit = 1u64 << (i % 64);
            let w = &mut self.failed[(i / 64) as usize];
            if on {
                *w |= bit
            } else {
                *w &= !bit
            }
        }
    }

    /// Writes the superblock into `out[..SB_BYTES]` (the tail zeroed). `out` must hold
    /// `SB_BYTES`; a shorter buffer is an error and nothing is written.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), SbError> {
        if out.len() < SB_BYTES {
            return Err(SbError::Short(out.len()));
        }
        let o = &mut out[..SB_BYTES];
        o.fill(0);
        let put32 =
            |o: &mut [u8], at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(o, 0, DM_RAID_MAGIC);
        put32(o, 4, self.compat_features);
        put32(o, 8, self.num_devices);
        put32(o, 12, self.array_position);
        put32(o, 48, self.level);
        put32(o, 52, self.layout);
        put32(o, 56, self.stripe_sectors);
        put32(o, 60, self.flags);
        put32(o, 72, self.new_level);
        put32(o, 76, self.new_layout);
        put32(o, 80, self.new_stripe_sectors);
        put32(o, 84, self.delta_disks);
        put32(o, 144, self.incompat_features);
        let put64 =
            |o: &mut [u8], at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put64(o, 16, self.events);
        put64(o, 24, self.failed[0]);
        put64(o, 32, self.disk_recovery_offset);
        put64(o, 40, self.array_resync_offset);
        put64(o, 64, self.reshape_position);
        put64(o, 88, self.array_sectors);
        put64(o, 96, self.data_offset);
        put64(o, 104, self.new_data_offset);
        put64(o, 112, self.sectors);
        for (i, w) in self.failed[1..].iter().enumerate() {
            put64(o, 120 + 8 * i, *w);
        }
        Ok(())
    }

    /// Reads a superblock. Checks the magic, the device count and position, and (for the
    /// extended layout) that no unknown incompatible feature is set. Pure; never panics.
    pub fn decode(b: &[u8]) -> Result<Superblock, SbError> {
        if b.len() < SB_STRUCT_BYTES {
            return Err(SbError::Short(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != DM_RAID_MAGIC {
            return Err(SbError::BadMagic(magic));
        }
        let compat = u32_at(b, 4);
        let ext = compat & FEATURE_V190 != 0;
        let mut sb = Superblock {
            compat_features: compat,
            num_devices: u32_at(b, 8),
            array_position: u32_at(b, 12),
            events: u64_at(b, 16),
            failed: [u64_at(b, 24), 0, 0, 0],
            disk_recovery_offset: u64_at(b, 32),
            array_resync_offset: u64_at(b, 40),
            level: u32_at(b, 48),
            layout: u32_at(b, 52),
            stripe_sectors: u32_at(b, 56),
            ..Superblock::default()
        };
        if ext {
            sb.flags = u32_at(b, 60);
            sb.reshape_position = u64_at(b, 64);
            sb.new_level = u32_at(b, 72);
            sb.new_layout = u32_at(b, 76);
            sb.new_stripe_sectors = u32_at(b, 80);
            sb.delta_disks = u32_at(b, 84);
            sb.array_sectors = u64_at(b, 88);
            sb.data_offset = u64_at(b, 96);
            sb.new_data_offset = u64_at(b, 104);
            sb.sectors = u64_at(b, 112);
            for i in 0..3 {
                sb.failed[i + 1] = u64_at(b, 120 + 8 * i);
            }
            sb.incompat_features = u32_at(b, 144);
            if sb.incompat_features != 0 {
                return Err(SbError::Incompat(sb.incompat_features));
            }
        }
        if sb.num_devices == 0 || sb.num_devices > MAX_DEVICES {
            return Err(SbError::Field("num_devices", sb.num_devices.into()));
        }
        if sb.array_position >= sb.num_devices {
            return Err(SbError::Field("array_position", sb.array_position.into()));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        let mut sb = Superblock {
            compat_features: FEATURE_V190,
            num_devices: 2,
            array_position: 1,
            events: 42,
            disk_recovery_offset: 1024,
            array_resync_offset: u64::MAX,
            level: LEVEL_RAID1,
            sectors: 8192,
            array_sectors: 8192,
            ..Superblock::default()
        };
        sb.set_failed(0, true);
        sb.set_failed(200, true);
        sb
    }

    #[test]
    fn round_trip_and_layout() {
        let sb = sample();
        let mut b = [0xAAu8; SB_BYTES];
        sb.encode(&mut b).unwrap();
        assert_eq!(&b[0..4], b"DmRd");
        assert!(b[SB_STRUCT_BYTES..].iter().all(|&x| x == 0));
        let back = Superblock::decode(&b).unwrap();
        assert_eq!(back, sb);
        assert!(back.is_failed(0) && back.is_failed(200) && !back.is_failed(1));
    }

    #[test]
    fn refuses_bad_input() {
        let sb = sample();
        let mut b = [0u8; SB_BYTES];
        assert_eq!(Superblock::decode(&b[..10]), Err(SbError::Short(10)));
        assert!(matches!(Superblock::decode(&b), Err(SbError::BadMagic(0))));
        sb.encode(&mut b).unwrap();
        b[12] = 9; // array_position 9 of 2
        assert!(matches!(
            Superblock::decode(&b),
            Err(SbError::Field("array_position", 9))
        ));
        sb.encode(&mut b).unwrap();
        b[144] = 1;
        assert_eq!(Superblock::decode(&b), Err(SbError::Incompat(1)));
        assert_eq!(sb.encode(&mut [0u8; 100]), Err(SbError::Short(100)));
    }
}
