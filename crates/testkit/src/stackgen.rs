//! Random stacks of `linear`, `striped`, `zero` and `error` volumes over leaves, built so that
//! every sector of the top volume lands on its own leaf sector (or on zero/error). That makes a
//! flat array, plus a per-sector kind, an exact reference for what the stack must do.

use crate::rng::Rng;
use stackbd_core::{DevId, Engine, Leaf, ReactorConfig, Sector};
use std::sync::Arc;

/// What a top-level sector maps to at the bottom of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorKind {
    /// A leaf sector: holds data.
    Data,
    /// A `zero` target: reads zeros, drops writes.
    Zero,
    /// An `error` target: every I/O fails.
    Error,
}

/// Where a sector lands at the bottom of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Loc {
    Leaf(u32, Sector),
    Zero,
    Error,
}

impl Loc {
    fn kind(self) -> SectorKind {
        match self {
            Loc::Leaf(..) => SectorKind::Data,
            Loc::Zero => SectorKind::Zero,
            Loc::Error => SectorKind::Error,
        }
    }
}

/// A generated stack, built in an engine.
pub struct Stack {
    pub engine: Engine,
    pub top: DevId,
    pub top_name: String,
    pub size: Sector,
    /// Per top-level sector.
    pub kinds: Vec<SectorKind>,
    /// Volume names with their tables, bottom-up (for failure messages).
    pub tables: Vec<(String, String)>,
    /// Leaves created, with their sizes in sectors.
    pub leaves: Vec<(String, Sector)>,
    pub depth: usize,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, t) in &self.tables {
            writeln!(f, "[volume.{n}]\n{t}")?;
        }
        Ok(())
    }
}

/// A region of a child device a segment maps onto.
#[derive(Clone, Copy, Debug)]
struct Region {
    child: usize,
    offset: Sector,
}

#[derive(Clone, Debug)]
enum Seg {
    Linear(Region),
    Striped { chunk: Sector, stripes: Vec<Region> },
    Zero,
    Error,
}

/// One volume level being generated: its segments and the child devices they use.
struct Level {
    segs: Vec<(Sector, Sector, Seg)>,
    /// Size each child device must have.
    child_sizes: Vec<Sector>,
}

/// Generator knobs.
#[derive(Clone, Copy, Debug)]
pub struct GenOpts {
    /// Volume layers: 1 = one volume over leaves.
    pub depth: usize,
    /// Top volume size bounds in sectors.
    pub min_size: Sector,
    pub max_size: Sector,
    /// Allow `zero` and `error` segments.
    pub holes: bool,
}

impl Default for GenOpts {
    fn default() -> Self {
        GenOpts {
            depth: 2,
            min_size: 256,
            max_size: 4096,
            holes: true,
        }
    }
}

fn gen_level(rng: &mut Rng, size: Sector, holes: bool) -> Level {
    let nchildren = rng.range(1, 2) as usize;
    let mut cursors = vec![rng.range(0, 16) * 8; nchildren];
    let mut segs = Vec::new();
    let mut start = 0;
    while start < size {
        let left = size - start;
        let roll = rng.range(0, 99);
        let seg_len;
        let seg = if holes && roll < 8 {
            seg_len = left.min(rng.range(1, 64));
            Seg::Zero
        } else if holes && roll < 14 {
            seg_len = left.min(rng.range(1, 64));
            Seg::Error
        } else if roll < 55 {
            seg_len = left.min(rng.range(1, 512));
            let c = rng.range(0, nchildren as u64 - 1) as usize;
            let r = Region {
                child: c,
                offset: cursors[c],
            };
            cursors[c] += seg_len + rng.range(0, 3) * 8;
            Seg::Linear(r)
        } else {
            // Striped: chunk >= 8 (not always a power of two), whole chunks per stripe.
            let n = rng.range(1, 4);
            let chunk = *rng.pick(&[8, 8, 16, 24, 32, 64]);
            let per = chunk * n;
            if left < per {
                seg_len = left;
                let c = rng.range(0, nchildren as u64 - 1) as usize;
                let r = Region {
                    child: c,
                    offset: cursors[c],
                };
                cursors[c] += seg_len;
                segs.push((start, seg_len, Seg::Linear(r)));
                start += seg_len;
                continue;
            }
            let chunks = rng.range(1, (left / per).min(6));
            seg_len = chunks * per;
            let stripes = (0..n)
                .map(|_| {
                    let c = rng.range(0, nchildren as u64 - 1) as usize;
                    let r = Region {
                        child: c,
                        offset: cursors[c],
                    };
                    cursors[c] += chunks * chunk + rng.range(0, 2) * 8;
                    r
                })
                .collect();
            Seg::Striped { chunk, stripes }
        };
        segs.push((start, seg_len, seg));
        start += seg_len;
    }
    let child_sizes = cursors
        .iter()
        .map(|&c| c + rng.range(0, 4) * 8 + 8)
        .collect();
    Level { segs, child_sizes }
}

/// The kind of sector `s` of a device described by `level` and its children's kinds.
fn level_kind(level: &Level, children: &[Vec<Loc>], s: Sector) -> Loc {
    let (start, _, seg) = level
        .segs
        .iter()
        .rev()
        .find(|(st, _, _)| *st <= s)
        .expect("sector in table");
    let off = s - start;
    match seg {
        Seg::Zero => Loc::Zero,
        Seg::Error => Loc::Error,
        Seg::Linear(r) => children[r.child][(r.offset + off) as usize],
        Seg::Striped { chunk, stripes } => {
            let n = stripes.len() as Sector;
            let (c, within) = (off / chunk, off % chunk);
            let r = stripes[(c % n) as usize];
            children[r.child][(r.offset + (c / n) * chunk + within) as usize]
        }
    }
}

fn table_text(level: &Level, names: &[String]) -> String {
    let mut t = String::new();
    for (start, len, seg) in &level.segs {
        let line = match seg {
            Seg::Zero => format!("{start} {len} zero"),
            Seg::Error => format!("{start} {len} error"),
            Seg::Linear(r) => format!("{start} {len} linear {} {}", names[r.child], r.offset),
            Seg::Striped { chunk, stripes } => {
                let mut l = format!("{start} {len} striped {} {chunk}", stripes.len());
                for r in stripes {
                    l.push_str(&format!(" {} {}", names[r.child], r.offset));
                }
                l
            }
        };
        t.push_str(&line);
        t.push('\n');
    }
    t
}

struct Builder<'a> {
    rng: Rng,
    engine: Engine,
    leaf: &'a mut dyn FnMut(Sector) -> Arc<dyn Leaf>,
    count: usize,
    tables: Vec<(String, String)>,
    leaves: Vec<(String, Sector)>,
    holes: bool,
}

impl Builder<'_> {
    /// Builds a device of `size` sectors with `depth` volume layers; returns its name and kinds.
    fn device(&mut self, size: Sector, depth: usize) -> (String, Vec<Loc>) {
        self.count += 1;
        if depth == 0 {
            let name = format!("leaf{}", self.count);
            let leaf = (self.leaf)(size);
            self.engine.add_leaf(&name, leaf).expect("add leaf");
            self.leaves.push((name.clone(), size));
            let idx = self.leaves.len() as u32;
            return (name, (0..size).map(|s| Loc::Leaf(idx, s)).collect());
        }
        let name = format!("vol{}", self.count);
        let level = gen_level(&mut self.rng, size, self.holes);
        let mut names = Vec::new();
        let mut kinds = Vec::new();
        for (i, &cs) in level.child_sizes.iter().enumerate() {
            // The first child keeps the full depth; others sometimes shortcut to a leaf.
            let d = if i > 0 && depth > 1 && self.rng.chance(30) {
                0
            } else {
                depth - 1
            };
            let (n, k) = self.device(cs, d);
            names.push(n);
            kinds.push(k);
        }
        let text = table_text(&level, &names);
        self.engine
            .create(&name, Some(&text))
            .unwrap_or_else(|e| panic!("generated table refused: {e}\n{text}"));
        self.tables.push((name.clone(), text));
        let k = (0..size).map(|s| level_kind(&level, &kinds, s)).collect();
        (name, k)
    }
}

/// Generates and builds a random stack from `seed`; `leaf` makes a leaf of the given sectors.
pub fn build(
    seed: u64,
    opts: GenOpts,
    cfg: ReactorConfig,
    leaf: &mut dyn FnMut(Sector) -> Arc<dyn Leaf>,
) -> Stack {
    let mut rng = Rng::new(seed);
    let size = rng.range(opts.min_size, opts.max_size);
    let engine = Engine::new(stackbd_targets::registry(), cfg);
    let mut b = Builder {
        rng,
        engine,
        leaf,
        count: 0,
        tables: Vec::new(),
        leaves: Vec::new(),
        holes: opts.holes,
    };
    let (top_name, locs) = b.device(size, opts.depth.max(1));
    // The reference is only exact if no two top sectors share a leaf sector.
    let mut seen = std::collections::HashSet::new();
    for (s, l) in locs.iter().enumerate() {
        if matches!(l, Loc::Leaf(..)) {
            assert!(
                seen.insert(*l),
                "generator bug: top sector {s} aliases {l:?} (seed {seed})"
            );
        }
    }
    let kinds = locs.iter().map(|l| l.kind()).collect();
    let top = b.engine.dev_id(&top_name).unwrap();
    Stack {
        engine: b.engine,
        top,
        top_name,
        size,
        kinds,
        tables: b.tables,
        leaves: b.leaves,
        depth: opts.depth.max(1),
    }
}

/// A mem leaf factory for `build`.
pub fn mem_leaves() -> impl FnMut(Sector) -> Arc<dyn Leaf> {
    |sectors| {
        Arc::new(stackbd_leaves::MemLeaf::new(sectors * 512).expect("mem leaf")) as Arc<dyn Leaf>
    }
}

/// A file leaf factory for `build`: each leaf is a fresh sparse temporary file in `dir`.
pub fn file_leaves(
    dir: &std::path::Path,
    direct: bool,
) -> impl FnMut(Sector) -> Arc<dyn Leaf> + '_ {
    let mut n = 0;
    move |sectors| {
        n += 1;
        let path = dir.join(format!("leaf{n}.img"));
        let f = std::fs::File::create(&path).expect("create leaf file");
        f.set_len(sectors * 512).expect("size leaf file");
        let opts = stackbd_leaves::file::FileOptions {
            direct,
            queue_depth: 32,
            ..Default::default()
        };
        Arc::new(stackbd_leaves::FileLeaf::open(&path, opts).expect("open file leaf"))
            as Arc<dyn Leaf>
    }
}
