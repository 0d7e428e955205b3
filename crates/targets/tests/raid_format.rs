//! dm-raid superblock and MD bitmap formats: mutating proptests (any byte changed in a valid
//! image decodes to an error or to a value that round-trips; nothing panics), arbitrary values
//! round-trip, and the superblock as the kernel's struct layout reads it.

#[path = "raid_util.rs"]
mod util;

use proptest::prelude::*;
use stackbd_targets::raid::bitmap::{self, BitmapSuper};
use stackbd_targets::raid::superblock::{Superblock, FEATURE_V190, SB_BYTES};

fn sb_strategy() -> impl Strategy<Value = Superblock> {
    (
        1u32..=253,
        any::<u64>(),
        any::<[u64; 4]>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_flat_map(|(n, events, failed, dro, aro, sectors, flags)| {
            (0..n).prop_map(move |pos| Superblock {
                compat_features: FEATURE_V190,
                num_devices: n,
                array_position: pos,
                events,
                failed,
                disk_recovery_offset: dro,
                array_resync_offset: aro,
                level: 1,
                flags,
                sectors,
                array_sectors: sectors,
                ..Superblock::default()
            })
        })
}

fn bm_strategy() -> impl Strategy<Value = BitmapSuper> {
    (
        9u32..=26,
        1u64..=(1 << 30),
        any::<u64>(),
        any::<u32>(),
        0u32..=16383,
    )
        .prop_map(|(shift, sync, events, sleep, wb)| BitmapSuper {
            version: bitmap::BITMAP_VERSION,
            events,
            events_cleared: events / 2,
            sync_size: sync,
            chunksize: 1 << shift,
            daemon_sleep: sleep,
            write_behind: wb,
            ..BitmapSuper::default()
        })
        .prop_filter("bitmap within bounds", |b| b.chunks().is_ok())
}

proptest! {
    #[test]
    fn superblock_round_trips_and_matches_the_kernel_layout(sb in sb_strategy()) {
        let mut b = [0u8; SB_BYTES];
        sb.encode(&mut b).unwrap();
        prop_assert_eq!(Superblock::decode(&b).unwrap(), sb);
        let k = util::kernel_sb(&b);
        prop_assert_eq!(&k.magic, b"DmRd");
        prop_assert_eq!(k.num_devices, sb.num_devices);
        prop_assert_eq!(k.array_position, sb.array_position);
        prop_assert_eq!(k.events, sb.events);
        prop_assert_eq!(k.failed_devices, sb.failed[0]);
        prop_assert_eq!(k.disk_recovery_offset, sb.disk_recovery_offset);
        prop_assert_eq!(k.array_resync_offset, sb.array_resync_offset);
        prop_assert_eq!(k.sectors, sb.sectors);
        prop_assert_eq!(k.compat_features, FEATURE_V190);
    }

    #[test]
    fn mutated_superblock_never_panics(sb in sb_strategy(), at in 0usize..160, v in any::<u8>(), cut in 0usize..=SB_BYTES) {
        let mut b = [0u8; SB_BYTES];
        sb.encode(&mut b).unwrap();
        b[at] = v;
        if let Ok(d) = Superblock::decode(&b[..cut]) {
            let mut again = [0u8; SB_BYTES];
            d.encode(&mut again).unwrap();
            prop_assert_eq!(Superblock::decode(&again).unwrap(), d);
        }
    }

    #[test]
    fn bitmap_round_trips_and_mutations_never_panic(bm in bm_strategy(), at in 0usize..256, v in any::<u8>(), bits in proptest::collection::vec(any::<u64>(), 0..20)) {
        let total = bm.total_bytes().unwrap().min(1 << 16);
        let mut b = vec![0u8; total];
        bm.encode(&mut b).unwrap();
        prop_assert_eq!(BitmapSuper::decode(&b).unwrap(), bm);
        let chunks = bm.chunks().unwrap();
        let mut set = std::collections::BTreeSet::new();
        for x in bits {
            let n = x % chunks;
            if bitmap::set_bit(&mut b, n, true) { set.insert(n); }
        }
        prop_assert_eq!(bitmap::count_dirty(&b, chunks.min(((total - 256) * 8) as u64)), set.len() as u64);
        b[at] = v;
        if let Ok(d) = BitmapSuper::decode(&b) {
            let mut again = vec![0u8; 256];
            d.encode(&mut again).unwrap();
            prop_assert_eq!(BitmapSuper::decode(&again).unwrap(), d);
        }
    }
}
