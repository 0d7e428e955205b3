//! Tables in dmsetup's text: `start length target args...`, in 512-byte sectors, contiguous from 0.

use crate::limits::Limits;
use crate::target::{CtorCx, DeviceLookup, Target, TargetRegistry};
use crate::{DevId, Sector};
use std::fmt;

/// One parsed line, before its target is constructed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableLine {
    /// 1-based line number in the text (blank and comment lines count).
    pub lineno: usize,
    pub start: Sector,
    pub len: Sector,
    pub target: String,
    pub args: Vec<String>,
}

/// A refused table: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {field}: {reason}")]
pub struct TableError {
    pub line: usize,
    pub field: String,
    pub reason: String,
}

impl TableError {
    fn new(line: usize, field: &str, reason: impl Into<String>) -> TableError {
        TableError {
            line,
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

fn parse_sector(line: usize, field: &str, s: &str) -> Result<Sector, TableError> {
    crate::target::parse_num::<Sector>(field, s).map_err(|e| TableError::new(line, field, e.reason))
}

/// The largest volume, in sectors: its size in bytes stays below 2^63, so it fits the signed
/// 64-bit sizes of NBD clients, `off_t` and every byte offset computed from it.
pub const MAX_VOLUME_SECTORS: Sector = (i64::MAX as u64) / crate::SECTOR_SIZE as u64;

/// Splits table text into lines and checks the layout (numbers, contiguity, no gaps or overlaps,
/// no zero lengths). `#` starts a comment; blank lines are ignored; `;` also ends a line, as some
/// tools join tables with it.
pub fn parse_lines(text: &str) -> Result<Vec<TableLine>, TableError> {
    let mut lines = Vec::new();
    let mut next: Sector = 0;
    let mut lineno = 0;
    for raw_line in text.split('\n') {
        lineno += 1;
        for piece in raw_line.split(';') {
            let content = piece.split('#').next().unwrap_or("");
            let mut words = content.split_ascii_whitespace();
            let Some(start) = words.next() else { continue };
            let start = parse_sector(lineno, "start", start)?;
            let len = words
                .next()
                .ok_or_else(|| TableError::new(lineno, "length", "missing"))?;
            let len = parse_sector(lineno, "length", len)?;
            let target = words
                .next()
                .ok_or_else(|| TableError::new(lineno, "target", "missing target type"))?;
            if len == 0 {
                return Err(TableError::new(lineno, "length", "zero length"));
            }
            if start != next {
                let what = if start > next { "gap" } else { "overlap" };
                return Err(TableError::new(
                    lineno,
                    "start",
                    format!("{what}: line starts at sector {start}, previous line ends at {next}"),
                ));
            }
            next = start
                .checked_add(len)
                .filter(|&end| end <= MAX_VOLUME_SECTORS)
                .ok_or_else(|| {
                    TableError::new(
                        lineno,
                        "length",
                        format!(
                            "volume size {} sectors exceeds 2^63 bytes: a volume is at most \
                             {MAX_VOLUME_SECTORS} sectors (2^63 - 512 bytes)",
                            start as u128 + len as u128
                        ),
                    )
                })?;
            lines.push(TableLine {
                lineno,
                start,
                len,
                target: target.to_string(),
                args: words.map(str::to_string).collect(),
            });
        }
    }
    if lines.is_empty() {
        return Err(TableError::new(lineno.max(1), "table", "empty table"));
    }
    Ok(lines)
}

/// One constructed target and where it sits.
#[derive(Debug)]
pub struct TableEntry {
    pub start: Sector,
    pub len: Sector,
    pub target: Box<dyn Target>,
    /// `Target::linear_remap`, asked once at build: the volume layer applies it without a call.
    pub(crate) fast: Option<(DevId, Sector)>,
}

/// A built, validated table: immutable once made; volumes swap whole tables.
#[derive(Debug)]
pub struct Table {
    entries: Vec<TableEntry>,
    /// `entries[i].start`, for the binary search of the mapping path.
    starts: Vec<Sector>,
    size: Sector,
    limits: Limits,
    /// (target, flush index) pairs that reach every distinct device under the table once.
    flush_plan: Vec<(u16, u32)>,
}

/// Bytes of a split frame's context; every volume level reserves room for one.
pub const SPLIT_FRAME_BYTES: usize = std::mem::size_of::<crate::bio::SplitCtx>();

/// A stack deeper than this is refused (frames are bounded per bio).
pub const MAX_STACK_FRAMES: u32 = crate::bio::MAX_FRAMES as u32;

impl Table {
    /// Builds a table from text. Refused whole on the first error, which names the line.
    pub fn build(
        text: &str,
        registry: &TargetRegistry,
        lookup: &dyn DeviceLookup,
        this: Option<(DevId, &str)>,
    ) -> Result<Table, TableError> {
        let lines = parse_lines(text)?;
        let mut entries = Vec::with_capacity(lines.len());
        for l in &lines {
            let ctor = registry.get(&l.target).ok_or_else(|| {
                let known: Vec<_> = registry.kinds().collect();
                TableError::new(
                    l.lineno,
                    "target",
                    format!(
                        "unknown target type '{}' (known: {})",
                        l.target,
                        known.join(", ")
                    ),
                )
            })?;
            let args: Vec<&str> = l.args.iter().map(String::as_str).collect();
            let cx = CtorCx::new(l.start, l.len, this, lookup);
            let target = ctor(&cx, &args).map_err(|e| {
                TableError::new(l.lineno, &format!("{} {}", l.target, e.field), e.reason)
            })?;
            entries.push(TableEntry {
                start: l.start,
                len: l.len,
                fast: target.linear_remap(),
                target,
            });
        }
        // A request-based table maps whole requests onto leaves, and cannot be mixed with
        // bio-based targets (its volume has one request queue in front of every target).
        if let Some(rq) = entries.iter().position(|e| e.target.request_based()) {
            for (i, e) in entries.iter().enumerate() {
                let line = lines[i].lineno;
                if !e.target.request_based() {
                    return Err(TableError::new(
                        line,
                        "target",
                        format!(
                            "'{}' is bio-based but line {} is request-based: a table cannot mix them",
                            e.target.kind(),
                            lines[rq].lineno
                        ),
                    ));
                }
                for d in e.target.devices() {
                    if lookup.lookup_id(d).is_some_and(|i| i.leaf.is_none()) {
                        return Err(TableError::new(
                            line,
                            "device",
                            "a request-based target maps onto leaves only, not volumes",
                        ));
                    }
                }
            }
        }
        let table = Table::from_entries(entries, &|id| lookup_limits(lookup, id));
        if table.limits.frame_depth > MAX_STACK_FRAMES {
            return Err(TableError::new(
                lines.last().map_or(1, |l| l.lineno),
                "table",
                format!(
                    "stack too deep: an I/O would need {} frames (at most {MAX_STACK_FRAMES})",
                    table.limits.frame_depth
                ),
            ));
        }
        Ok(table)
    }

    /// Assembles a table from constructed targets and stacks its limits.
    /// True if the table's targets map requests (the volume has a request queue).
    pub fn request_based(&self) -> bool {
        self.entries
            .first()
            .is_some_and(|e| e.target.request_based())
    }

    pub fn from_entries(entries: Vec<TableEntry>, child: &dyn Fn(DevId) -> Limits) -> Table {
        let mut limits = Limits::TOP;
        let mut below = Limits::TOP;
        let mut flush_plan = Vec::new();
        let mut flushed: Vec<DevId> = Vec::new();
        for (ti, e) in entries.iter().enumerate() {
            for (k, d) in e.target.flush_devices().into_iter().enumerate() {
                if !flushed.contains(&d) {
                    flushed.push(d);
                    flush_plan.push((ti as u16, k as u32));
                }
            }
        }
        for e in &entries {
            let mut l = e.target.limits(child);
            if e.target.frame_bytes() > 0 {
                l.add_frame(e.target.frame_bytes());
            }
            below.stack(&l);
        }
        // The deepest target need, plus this volume's own entry and split frames.
        limits.stack(&below);
        limits.per_io_bytes = below.per_io_bytes;
        limits.frame_depth = below.frame_depth;
        limits.add_frame(0); // volume entry
        limits.add_frame(SPLIT_FRAME_BYTES);
        let size = entries.last().map_or(0, |e| e.start + e.len);
        let starts = entries.iter().map(|e| e.start).collect();
        Table {
            entries,
            starts,
            size,
            limits,
            flush_plan,
        }
    }

    pub fn size(&self) -> Sector {
        self.size
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn entries(&self) -> &[TableEntry] {
        &self.entries
    }

    /// Which (target, flush index) pairs an empty flush is sent to.
    pub fn flush_plan(&self) -> &[(u16, u32)] {
        &self.flush_plan
    }

    /// Index of the target holding `sector` (which must be < size).
    #[inline]
    pub fn find(&self, sector: Sector) -> usize {
        if self.entries.len() == 1 {
            return 0;
        }
        self.starts.partition_point(|&s| s <= sector) - 1
    }

    /// Every device the table maps onto, without repeats, in table order.
    pub fn devices(&self) -> Vec<DevId> {
        let mut out: Vec<DevId> = Vec::new();
        for e in &self.entries {
            for d in e.target.devices() {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// `dmsetup status` lines.
    pub fn status_text(&self) -> String {
        self.lines_with(|t| t.status())
    }

    fn lines_with(&self, f: impl Fn(&dyn Target) -> String) -> String {
        let mut s = String::new();
        for e in &self.entries {
            let rest = f(e.target.as_ref());
            s.push_str(&format!("{} {} {}", e.start, e.len, e.target.kind()));
            if !rest.is_empty() {
                s.push(' ');
                s.push_str(&rest);
            }
            s.push('\n');
        }
        s
    }
}

fn lookup_limits(lookup: &dyn DeviceLookup, id: DevId) -> Limits {
    // Constructors resolved these ids through the same lookup; a miss is a bug in a target.
    lookup
        .lookup_id(id)
        .map(|i| i.limits)
        .expect("target names a device the lookup does not know")
}

/// The canonical text: one line per target, single spaces, numbers without leading zeros.
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines_with(|t| t.args()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_comments_and_semicolons() {
        let t =
            parse_lines("# a comment\n0 8 zero\n\n8 16 linear m0 0 # tail\n24 8 error; 32 8 zero")
                .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[0],
            TableLine {
                lineno: 2,
                start: 0,
                len: 8,
                target: "zero".into(),
                args: vec![]
            }
        );
        assert_eq!(t[1].args, vec!["m0", "0"]);
        assert_eq!(t[1].lineno, 4);
        assert_eq!((t[3].lineno, t[3].start), (5, 32));
    }

    #[test]
    fn refuses_layout_errors_with_the_line_and_field() {
        let cases = [
            ("0 8 zero\n16 8 zero", 2, "start", "gap"),
            ("0 8 zero\n4 8 zero", 2, "start", "overlap"),
            ("8 8 zero", 1, "start", "gap"),
            ("0 0 zero", 1, "length", "zero length"),
            ("0 x8 zero", 1, "length", "not a non-negative integer"),
            ("-1 8 zero", 1, "start", "not a non-negative integer"),
            ("0 8", 1, "target", "missing"),
            ("0", 1, "length", "missing"),
            ("", 1, "table", "empty"),
            (
                "0 99999999999999999999999 zero",
                1,
                "length",
                "out of range",
            ),
            (
                "0 18446744073709551615 zero\n18446744073709551615 1 zero",
                1,
                "length",
                "exceeds 2^63 bytes",
            ),
            // The sum of two lines, each in range, past the cap (and past 2^64).
            (
                "0 18014398509481983 zero\n18014398509481983 1 zero",
                2,
                "length",
                "volume size 18014398509481984 sectors exceeds 2^63 bytes",
            ),
            (
                "0 9223372036854775807 zero\n9223372036854775807 18446744073709551615 zero",
                1,
                "length",
                "exceeds 2^63 bytes",
            ),
        ];
        // The largest volume there is: 2^63 - 512 bytes.
        let max = format!("0 {MAX_VOLUME_SECTORS} zero");
        assert_eq!(parse_lines(&max).unwrap()[0].len, (1 << 54) - 1);
        for (text, line, field, reason) in cases {
            let e = parse_lines(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert_eq!(e.field, field, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }
}
