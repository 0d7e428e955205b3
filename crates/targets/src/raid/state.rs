//! The raid set's shared state: leg health, per-region bitmap state, in-flight counts and resync
//! marks, all atomics (any reactor reads and changes them without a lock), plus the doorbells
//! and the volume's event counter. Owned by the [`super::Raid`] instance (an `Arc`), shared by
//! every reactor and the control plane. Nothing here blocks or allocates after construction,
//! except [`Shared::add_bell`] (reactor-state creation, not the data path).

use arc_swap::{ArcSwap, ArcSwapOption};
use stackbd_core::target::TargetEnv;
use stackbd_core::{DevRef, Doorbell};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};

/// Leg health.
pub mod leg {
    /// Holds every region: reads and writes.
    pub const IN_SYNC: u8 = 0;
    /// Coming back: written, read only where its `need` bit is clear.
    pub const RECOVER: u8 = 1;
    /// Failed or absent: neither read nor written.
    pub const FAILED: u8 = 2;
    /// Just taken back: written, never read, `need` being computed.
    pub const JOINING: u8 = 3;
}

/// A region's bitmap state.
pub mod bit {
    /// Bit clear on disk; a write must set it first.
    pub const CLEAN: u8 = 0;
    /// A write wants the bit; the next metadata batch sets it.
    pub const WANT: u8 = 1;
    /// In the metadata batch being written.
    pub const WRITING: u8 = 2;
    /// Set and durable: writes go at once.
    pub const DIRTY: u8 = 3;
    /// Being cleared by the daemon (a write turns it back to WANT); still set on disk.
    pub const CLEARING: u8 = 4;
    /// In a clearing batch whose data flush started: written clear by that batch.
    pub const CLEAR_FLUSHING: u8 = 5;
}

/// Load progress.
pub mod load {
    /// Nothing read yet.
    pub const UNLOADED: u8 = 0;
    /// The metadata reads are in flight.
    pub const LOADING: u8 = 1;
    /// Loaded: I/O goes.
    pub const READY: u8 = 2;
}

/// The background action, as `status` names it.
pub mod action {
    /// Nothing running.
    pub const IDLE: u8 = 0;
    /// Background work stopped (`frozen`).
    pub const FROZEN: u8 = 1;
    /// Copying regions a crash or `sync` marked.
    pub const RESYNC: u8 = 2;
    /// Copying regions to legs coming back.
    pub const RECOVER: u8 = 3;
    /// Comparing the legs (`check`).
    pub const CHECK: u8 = 4;
    /// Comparing and fixing the legs (`repair`).
    pub const REPAIR: u8 = 5;

    /// The word `status` prints for action `a`.
    pub fn name(a: u8) -> &'static str {
        match a {
            FROZEN => "frozen",
            RESYNC => "resync",
            RECOVER => "recover",
            CHECK => "check",
            REPAIR => "repair",
            _ => "idle",
        }
    }
}

/// One leg: its devices (from the table) and its health.
#[derive(Debug)]
pub struct Leg {
    /// The metadata device (superblock + bitmap), from the table; None for `-`.
    pub meta: Option<DevRef>,
    /// The data device, from the table; None for `-` (a missing leg).
    pub data: Option<DevRef>,
    /// Reads avoid this leg (`write_mostly <idx>`).
    pub write_mostly: bool,
    /// The leg's health (a [`leg`] value); any reactor changes it with a CAS.
    pub state: AtomicU8,
}

/// State shared by every reactor and the control plane. See the module doc.
#[derive(Debug)]
pub struct Shared {
    /// The legs in table order (fixed at construction).
    pub legs: Vec<Leg>,
    /// Data sectors (the target's length).
    pub len: u64,
    /// log2 of the region size in sectors.
    pub region_shift: u32,
    /// Regions (bitmap bits) covering the data.
    pub regions: u64,
    /// Each region's bitmap state (a [`bit`] value).
    pub bits: Box<[AtomicU8]>,
    /// Writes (and resync copies) in flight per region.
    pub inflight: Box<[AtomicU32]>,
    /// Daemon ticks a DIRTY region has been idle.
    pub age: Box<[AtomicU8]>,
    /// A resync/check copy of the region is running: writes wait.
    pub busy: Box<[AtomicBool]>,
    /// Legs (bit per index) that must get this region copied.
    pub need: Box<[AtomicU64]>,
    /// Regions in WANT (a hint for the batch starter).
    pub want: AtomicU32,
    /// One metadata batch at a time: whoever holds this writes the metadata.
    pub meta_token: AtomicBool,
    /// Raised on every leg failure; a batch records the value it covers in `durable_gen`.
    pub fail_gen: AtomicU64,
    /// The `fail_gen` the last completed metadata batch covered.
    pub durable_gen: AtomicU64,
    /// A superblock update is wanted even without bit changes.
    pub sb_dirty: AtomicBool,
    /// The daemon marked regions CLEARING: the next batch flushes data and clears them.
    pub clear_pending: AtomicBool,
    /// Superblock events (raised per batch).
    pub events: AtomicU64,
    /// Events of the last batch that cleared bits (bitmap `events_cleared`).
    pub events_cleared: AtomicU64,
    /// Load progress (a [`load`] value).
    pub load: AtomicU8,
    /// The reactor that loaded the set and runs the daemon and the resync driver.
    pub home: AtomicUsize,
    /// The background action (an [`action`] value), set by messages and the driver.
    pub action: AtomicU8,
    /// The driver should (re)start: set by messages, load, recovery.
    pub kick: AtomicBool,
    /// Sectors found different by the last `check`/`repair`.
    pub mismatches: AtomicU64,
    /// Regions copied by resync/recovery/repair since the table was loaded.
    pub copied_regions: AtomicU64,
    /// The region the driver is at (for progress).
    pub cursor: AtomicU64,
    /// Every reactor's doorbell for this target (ringing all runs their `wake`).
    pub bells: ArcSwap<Vec<Doorbell>>,
    /// The volume's name and event counter, set by `activate`.
    pub env: ArcSwapOption<TargetEnv>,
    /// Legs a `recover` (or start-up) made rebuild in full.
    pub full_rebuild: AtomicU64,
}

impl Shared {
    /// Builds the state for `regions` regions, all clean, every leg with a data device in sync.
    /// Control plane; allocates.
    pub fn new(legs: Vec<Leg>, len: u64, region_shift: u32) -> Shared {
        let regions = len.div_ceil(1 << region_shift);
        let n = regions as usize;
        Shared {
            legs,
            len,
            region_shift,
            regions,
            bits: (0..n).map(|_| AtomicU8::new(bit::CLEAN)).collect(),
            inflight: (0..n).map(|_| AtomicU32::new(0)).collect(),
            age: (0..n).map(|_| AtomicU8::new(0)).collect(),
            busy: (0..n).map(|_| AtomicBool::new(false)).collect(),
            need: (0..n).map(|_| AtomicU64::new(0)).collect(),
            want: AtomicU32::new(0),
            meta_token: AtomicBool::new(false),
            fail_gen: AtomicU64::new(0),
            durable_gen: AtomicU64::new(0),
            sb_dirty: AtomicBool::new(false),
            clear_pending: AtomicBool::new(false),
            events: AtomicU64::new(0),
            events_cleared: AtomicU64::new(0),
            load: AtomicU8::new(load::UNLOADED),
            home: AtomicUsize::new(usize::MAX),
            action: AtomicU8::new(action::IDLE),
            kick: AtomicBool::new(false),
            mismatches: AtomicU64::new(0),
            copied_regions: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            bells: ArcSwap::from_pointee(Vec::new()),
            env: ArcSwapOption::empty(),
            full_rebuild: AtomicU64::new(0),
        }
    }

    /// Sectors per region.
    pub fn region_sectors(&self) -> u64 {
        1 << self.region_shift
    }

    /// Registers a reactor's doorbell. Reactor-state creation (may allocate).
    pub fn add_bell(&self, b: Doorbell) {
        self.bells.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(b.clone());
            v
        });
    }

    /// Rings every reactor's doorbell (their `wake` unparks what can go). Any thread; no
    /// allocation, no lock.
    pub fn ring_all(&self) {
        for b in self.bells.load().iter() {
            b.ring();
        }
    }

    /// Raises the volume's event counter (`dmsetup wait` wakes). Any thread.
    pub fn raise_event(&self) {
        if let Some(env) = &*self.env.load() {
            env.events.raise();
        }
    }

    /// Leg `i`'s health (a [`leg`] value).
    pub fn leg_state(&self, i: usize) -> u8 {
        self.legs[i].state.load(SeqCst)
    }

    /// Legs that take writes (in sync, recovering or joining), as a mask.
    pub fn write_mask(&self) -> u64 {
        let mut m = 0;
        for (i, l) in self.legs.iter().enumerate() {
            if l.data.is_some() && l.state.load(SeqCst) != leg::FAILED {
                m |= 1 << i;
            }
        }
        m
    }

    /// Marks leg `i` failed, unless it is the last leg holding every region (MD never fails
    /// its last in-sync device). Returns true if the leg changed state. Any thread.
    pub fn fail_leg(&self, i: usize, why: &str) -> bool {
        let others_in_sync = self
            .legs
            .iter()
            .enumerate()
            .any(|(j, l)| j != i && l.data.is_some() && l.state.load(SeqCst) == leg::IN_SYNC);
        let cur = self.legs[i].state.load(SeqCst);
        if cur == leg::FAILED || (cur == leg::IN_SYNC && !others_in_sync) {
            return false;
        }
        if self.legs[i]
            .state
            .compare_exchange(cur, leg::FAILED, SeqCst, SeqCst)
            .is_err()
        {
            return false;
        }
        self.fail_gen.fetch_add(1, SeqCst);
        self.sb_dirty.store(true, SeqCst);
        tracing::warn!(
            leg = i,
            "raid1: leg failed ({why}); I/O goes on with the others"
        );
        self.raise_event();
        true
    }

    /// Asks the next metadata batch to set region `r`'s bit (CLEAN/CLEARING -> WANT).
    pub fn want_bit(&self, r: usize) {
        for from in [bit::CLEAN, bit::CLEARING, bit::CLEAR_FLUSHING] {
            if self.bits[r]
                .compare_exchange(from, bit::WANT, SeqCst, SeqCst)
                .is_ok()
            {
                self.want.fetch_add(1, SeqCst);
                return;
            }
        }
    }

    /// True if a metadata batch has work: wanted bits or a superblock change.
    pub fn meta_pending(&self) -> bool {
        self.want.load(SeqCst) > 0
            || self.sb_dirty.load(SeqCst)
            || self.clear_pending.load(SeqCst)
            || self.durable_gen.load(SeqCst) < self.fail_gen.load(SeqCst)
    }

    /// The bit as the next batch writes it: clear only for regions clean, or cleared by this
    /// batch after its data flush, and needing no copy. Setting a bit too many is always safe.
    pub fn bit_on_disk(&self, r: usize) -> bool {
        !matches!(self.bits[r].load(SeqCst), bit::CLEAN | bit::CLEAR_FLUSHING)
            || self.need[r].load(SeqCst) != 0
    }

    /// Regions with some leg still to copy (sync progress).
    pub fn regions_needing(&self) -> u64 {
        self.need.iter().filter(|n| n.load(SeqCst) != 0).count() as u64
    }

    /// True when every leg with a data device is in sync.
    pub fn all_in_sync(&self) -> bool {
        self.legs
            .iter()
            .all(|l| l.data.is_none() || l.state.load(SeqCst) == leg::IN_SYNC)
    }

    /// A leg in sync and up to date for region `r`, other than those in `skip` (a copy source).
    pub fn source_for(&self, r: usize, skip: u64) -> Option<usize> {
        let need = self.need[r].load(SeqCst);
        (0..self.legs.len()).find(|&i| {
            let l = &self.legs[i];
            l.data.is_some()
                && skip & (1 << i) == 0
                && need & (1 << i) == 0
                && l.state.load(SeqCst) == leg::IN_SYNC
        })
    }

    /// The health characters of `status` (`A` in sync, `a` coming back, `D` failed).
    pub fn health(&self) -> String {
        self.legs
            .iter()
            .map(|l| match (l.data.is_some(), l.state.load(SeqCst)) {
                (false, _) | (_, leg::FAILED) => 'D',
                (_, leg::IN_SYNC) => 'A',
                _ => 'a',
            })
            .collect()
    }
}
