//! dm-raid's table line for raid1, parsed and printed. Control plane only (the thread loading
//! the table); allocates freely, never touches a device.
//!
//! `raid1 <#raid_params> <chunk_size> [sync|nosync] [rebuild <idx>]... [daemon_sleep <ms>]
//! [min_recovery_rate <kB/s/disk>] [max_recovery_rate <kB/s/disk>] [write_mostly <idx>]...
//! [max_write_behind <sectors>] [region_size <sectors>] <#raid_devs> (<meta_dev>|- <data_dev>|-)+`
//!
//! `#raid_params` counts `chunk_size` and every parameter word after it. Other levels (raid0,
//! raid4/5/6, raid10) and the parameters only they take are refused with a clear error.

use stackbd_core::target::parse_num;
use stackbd_core::ArgError;

/// Most legs stackbd takes (leg masks are one `u64`).
pub const MAX_LEGS: usize = 64;
/// dm-raid's default bitmap daemon period.
pub const DEFAULT_DAEMON_SLEEP_MS: u32 = 5000;

/// A parsed raid1 table line (device names not yet resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaidArgs {
    /// Ignored for raid1, kept to print back.
    pub chunk_size: u32,
    /// `Some(true)`: `sync` (resync everything); `Some(false)`: `nosync` (skip the initial sync).
    pub sync: Option<bool>,
    /// Legs to rebuild in full (bit per index).
    pub rebuild: u64,
    /// `daemon_sleep_ms` from the table line (None: not given).
    pub daemon_sleep_ms: Option<u32>,
    /// `min_recovery_rate` from the table line (None: not given).
    pub min_recovery_rate: Option<u32>,
    /// `max_recovery_rate` from the table line (None: not given).
    pub max_recovery_rate: Option<u32>,
    /// Legs reads avoid (bit per index).
    pub write_mostly: u64,
    /// `max_write_behind` from the table line (None: not given).
    pub max_write_behind: Option<u32>,
    /// `region_size` from the table line (None: not given).
    pub region_size: Option<u32>,
    /// `(meta, data)` per leg; `None` for `-`.
    pub legs: Vec<(Option<String>, Option<String>)>,
}

fn bad(field: &str, reason: impl Into<String>) -> ArgError {
    ArgError::new(field, reason)
}

fn num(field: &str, s: Option<&&str>) -> Result<u32, ArgError> {
    let s = s.ok_or_else(|| bad(field, "value missing"))?;
    parse_num::<u32>(field, s)
}

impl RaidArgs {
    /// Parses the arguments after the target name.
    pub fn parse(args: &[&str]) -> Result<RaidArgs, ArgError> {
        let level = *args.first().ok_or_else(|| bad("raid_type", "missing"))?;
        match level.to_ascii_lowercase().as_str() {
            "raid1" => {}
            "raid0" | "raid4" | "raid5_la" | "raid5_ra" | "raid5_ls" | "raid5_rs" | "raid5_n"
            | "raid6_zr" | "raid6_nr" | "raid6_nc" | "raid6_n_6" | "raid6_la_6" | "raid6_ra_6"
            | "raid6_ls_6" | "raid6_rs_6" | "raid10" | "raid5" | "raid6" => {
                return Err(bad(
                    "raid_type",
                    format!("'{level}' is not supported by stackbd yet (only raid1)"),
                ))
            }
            _ => return Err(bad("raid_type", format!("unknown raid type '{level}'"))),
        }
        let nparams = parse_num::<usize>("#raid_params", args.get(1).copied().unwrap_or(""))?;
        if nparams == 0 {
            return Err(bad("#raid_params", "must count at least chunk_size"));
        }
        let end = nparams
            .checked_add(2)
            .filter(|&e| e <= args.len())
            .ok_or_else(|| {
                bad(
                    "#raid_params",
                    format!("{nparams} parameters announced, fewer given"),
                )
            })?;
        let params = &args[2..end];
        let mut a = RaidArgs {
            chunk_size: parse_num("chunk_size", params[0])?,
            ..RaidArgs::default()
        };
        let mut rebuild_idx = Vec::new();
        let mut wm_idx = Vec::new();
        let mut it = params[1..].iter();
        while let Some(&w) = it.next() {
            let dup = |f: &str| bad(f, "given twice");
            match w.to_ascii_lowercase().as_str() {
                "sync" | "nosync" => {
                    if a.sync.is_some() {
                        return Err(bad(w, "sync and nosync given more than once"));
                    }
                    a.sync = Some(w.eq_ignore_ascii_case("sync"));
                }
                "rebuild" => rebuild_idx.push(num("rebuild", it.next())?),
                "write_mostly" => wm_idx.push(num("write_mostly", it.next())?),
                "daemon_sleep" => {
                    let v = num("daemon_sleep", it.next())?;
                    if v == 0 || v > 3_600_000 {
                        return Err(bad("daemon_sleep", format!("{v} ms out of 1..=3600000")));
                    }
                    if a.daemon_sleep_ms.replace(v).is_some() {
                        return Err(dup("daemon_sleep"));
                    }
                }
                "min_recovery_rate" => {
                    if a.min_recovery_rate.replace(num(w, it.next())?).is_some() {
                        return Err(dup(w));
                    }
                }
                "max_recovery_rate" => {
                    let v = num(w, it.next())?;
                    if v == 0 {
                        return Err(bad(w, "must be positive"));
                    }
                    if a.max_recovery_rate.replace(v).is_some() {
                        return Err(dup(w));
                    }
                }
                "max_write_behind" => {
                    let v = num(w, it.next())?;
                    if v > 16383 {
                        return Err(bad(w, format!("{v} above 16383")));
                    }
                    if a.max_write_behind.replace(v).is_some() {
                        return Err(dup(w));
                    }
                }
                "region_size" => {
                    let v = num(w, it.next())?;
                    if v < 8 || !v.is_power_of_two() || v > (1 << 22) {
                        return Err(bad(
                            w,
                            format!("{v} sectors: a power of two in 8..=4194304"),
                        ));
                    }
                    if a.region_size.replace(v).is_some() {
                        return Err(dup(w));
                    }
                }
                "stripe_cache"
                | "raid10_copies"
                | "raid10_format"
                | "delta_disks"
                | "data_offset"
                | "journal_dev"
                | "journal_mode"
                | "raid10_use_near_sets" => return Err(bad(w, "not a raid1 parameter")),
                _ => return Err(bad("raid_params", format!("unknown parameter '{w}'"))),
            }
        }
        if let (Some(lo), Some(hi)) = (a.min_recovery_rate, a.max_recovery_rate) {
            if lo > hi {
                return Err(bad("min_recovery_rate", "above max_recovery_rate"));
            }
        }
        let rest = &args[end..];
        let ndevs = parse_num::<usize>("#raid_devs", rest.first().copied().unwrap_or(""))?;
        if !(1..=MAX_LEGS).contains(&ndevs) {
            return Err(bad("#raid_devs", format!("{ndevs} legs: 1..={MAX_LEGS}")));
        }
        let pairs = &rest[1..];
        if pairs.len() != ndevs * 2 {
            return Err(bad(
                "devices",
                format!("{ndevs} legs need {} words, got {}", ndevs * 2, pairs.len()),
            ));
        }
        let opt = |s: &str| (s != "-").then(|| s.to_string());
        a.legs = pairs.chunks(2).map(|p| (opt(p[0]), opt(p[1]))).collect();
        if a.legs.iter().all(|l| l.1.is_none()) {
            return Err(bad("devices", "no leg has a data device"));
        }
        for (name, idx, mask) in [
            ("rebuild", rebuild_idx, &mut a.rebuild),
            ("write_mostly", wm_idx, &mut a.write_mostly),
        ] {
            for i in idx {
                if i as usize >= ndevs {
                    return Err(bad(name, format!("index {i} past the {ndevs} legs")));
                }
                if *mask & (1 << i) != 0 {
                    return Err(bad(name, format!("index {i} given twice")));
                }
                *mask |= 1 << i;
            }
        }
        if a.rebuild.count_ones() as usize >= ndevs {
            return Err(bad("rebuild", "cannot rebuild every leg"));
        }
        if a.write_mostly.count_ones() as usize >= ndevs {
            return Err(bad(
                "write_mostly",
                "at least one leg must not be write_mostly",
            ));
        }
        if a.rebuild != 0 && a.sync.is_some() {
            return Err(bad("rebuild", "conflicts with sync/nosync"));
        }
        Ok(a)
    }

    /// The daemon period in milliseconds.
    pub fn daemon_sleep(&self) -> u32 {
        self.daemon_sleep_ms.unwrap_or(DEFAULT_DAEMON_SLEEP_MS)
    }

    /// Region size in sectors for `len` sectors of data: the table's, or the smallest power of
    /// two from 1024 sectors that keeps the bitmap at most 2^21 bits (dm-raid's rule).
    pub fn region_sectors(&self, len: u64) -> u64 {
        if let Some(r) = self.region_size {
            return r.into();
        }
        let mut r = 1024u64;
        while len.div_ceil(r) > 1 << 21 {
            r <<= 1;
        }
        r
    }

    /// The table line as dm-raid prints it (`STATUSTYPE_TABLE`), leg names given.
    pub fn table_args(&self) -> String {
        let mut p = vec![self.chunk_size.to_string()];
        match self.sync {
            Some(true) => p.push("sync".into()),
            Some(false) => p.push("nosync".into()),
            None => {}
        }
        for i in 0..self.legs.len() {
            if self.rebuild & (1 << i) != 0 {
                p.extend(["rebuild".into(), i.to_string()]);
            }
        }
        if let Some(v) = self.daemon_sleep_ms {
            p.extend(["daemon_sleep".into(), v.to_string()]);
        }
        if let Some(v) = self.min_recovery_rate {
            p.extend(["min_recovery_rate".into(), v.to_string()]);
        }
        if let Some(v) = self.max_recovery_rate {
            p.extend(["max_recovery_rate".into(), v.to_string()]);
        }
        for i in 0..self.legs.len() {
            if self.write_mostly & (1 << i) != 0 {
                p.extend(["write_mostly".into(), i.to_string()]);
            }
        }
        if let Some(v) = self.max_write_behind {
            p.extend(["max_write_behind".into(), v.to_string()]);
        }
        if let Some(v) = self.region_size {
            p.extend(["region_size".into(), v.to_string()]);
        }
        let mut s = format!("raid1 {} {}", p.len(), p.join(" "));
        s.push_str(&format!(" {}", self.legs.len()));
        for (m, d) in &self.legs {
            s.push_str(&format!(
                " {} {}",
                m.as_deref().unwrap_or("-"),
                d.as_deref().unwrap_or("-")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<RaidArgs, ArgError> {
        RaidArgs::parse(&s.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn parses_and_prints() {
        let a = p("raid1 8 0 nosync region_size 128 write_mostly 1 daemon_sleep 50 2 m0 d0 - d1")
            .unwrap();
        assert_eq!(a.sync, Some(false));
        assert_eq!(a.region_sectors(1 << 20), 128);
        assert_eq!(a.write_mostly, 2);
        assert_eq!(a.legs[1], (None, Some("d1".into())));
        assert_eq!(
            a.table_args(),
            "raid1 8 0 nosync daemon_sleep 50 write_mostly 1 region_size 128 2 m0 d0 - d1"
        );
        assert_eq!(p(&a.table_args()).unwrap(), a);
    }

    #[test]
    fn refuses() {
        for (line, field) in [
            ("raid5_ls 1 64 3 - a - b - c", "raid_type"),
            ("raid1 3 0 sync 2 - a - b", "raid_params"),
            ("raid1 9 0 sync 2 - a - b", "#raid_params"),
            ("raid1 2 0 rebuild 2 - a - b", "rebuild"),
            ("raid1 3 0 rebuild 2 2 - a - b", "rebuild"),
            ("raid1 3 0 region_size 100 2 - a - b", "region_size"),
            ("raid1 1 0 2 - a - ", "devices"),
            ("raid1 1 0 2 - - - -", "devices"),
            ("raid1 1 0 0", "#raid_devs"),
            ("raid1 2 0 bogus 2 - a - b", "raid_params"),
            (
                "raid1 3 0 daemon_sleep 99999999999 2 - a - b",
                "daemon_sleep",
            ),
            ("raid1 3 0 sync nosync 2 - a - b", "nosync"),
            ("raid1 3 0 write_mostly 0 1 - a", "write_mostly"),
        ] {
            let e = p(line).expect_err(line);
            assert_eq!(e.field, field, "{line}: {e:?}");
        }
    }
}
