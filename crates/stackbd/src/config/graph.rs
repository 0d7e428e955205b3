//! The volume graph: dependency order and cycles. Volumes are indexes; `deps[i]` lists the
//! volumes volume `i` uses.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Volume dependency order (Kahn, ties in file order), and the volumes left over (in or above
/// a cycle). `deps[i]` are the indexes of the volumes volume `i` uses.
pub(super) fn topo_order(deps: &[Vec<usize>]) -> (Vec<usize>, Vec<usize>) {
    let n = deps.len();
    let mut users = vec![Vec::new(); n];
    let mut pending = vec![0usize; n];
    for (i, ds) in deps.iter().enumerate() {
        pending[i] = ds.len();
        for &d in ds {
            users[d].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.insert(u);
            }
        }
    }
    let left = (0..n).filter(|&i| pending[i] > 0).collect();
    (order, left)
}

/// Strongly connected components among `nodes` (Tarjan), each sorted.
pub(super) fn components(deps: &[Vec<usize>], nodes: &[usize]) -> Vec<Vec<usize>> {
    struct St<'a> {
        deps: &'a [Vec<usize>],
        index: HashMap<usize, usize>,
        low: HashMap<usize, usize>,
        on: BTreeSet<usize>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut St<'_>, v: usize) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        for &w in &s.deps[v] {
            if !s.index.contains_key(&w) {
                visit(s, w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(&v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(&v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[&v] == s.index[&v] {
            let mut c = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(&w);
                c.push(w);
                if w == v {
                    break;
                }
            }
            c.sort_unstable();
            s.out.push(c);
        }
    }
    let mut s = St {
        deps,
        index: HashMap::new(),
        low: HashMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for &v in nodes {
        if !s.index.contains_key(&v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Shortest way from `start` back to itself inside component `comp`.
pub(super) fn cycle_through(deps: &[Vec<usize>], comp: &[usize], start: usize) -> Vec<usize> {
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in &deps[v] {
            if !comp.contains(&w) {
                continue;
            }
            if w == start {
                // Walk back from `v` to `start`, then turn it around.
                let mut path = vec![start];
                let mut at = v;
                while at != start {
                    path.push(at);
                    at = prev[&at];
                }
                path[1..].reverse();
                path.push(start);
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("a component with a cycle has a way back to each member")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_dependencies_first_ties_by_index() {
        // 0 uses 2, 1 uses nothing, 2 uses 1, 3 uses 0 and 1.
        let deps = vec![vec![2], vec![], vec![1], vec![0, 1]];
        assert_eq!(topo_order(&deps), (vec![1, 2, 0, 3], vec![]));
    }

    #[test]
    fn leaves_cycles_and_what_stands_on_them() {
        // 0 -> 1 -> 2 -> 0, 3 uses 0, 4 uses itself, 5 is free.
        let deps = vec![vec![1], vec![2], vec![0], vec![0], vec![4], vec![]];
        let (order, left) = topo_order(&deps);
        assert_eq!(order, vec![5]);
        assert_eq!(left, vec![0, 1, 2, 3, 4]);
        let mut comps = components(&deps, &left);
        comps.sort();
        assert_eq!(comps, vec![vec![0, 1, 2], vec![3], vec![4]]);
        assert_eq!(cycle_through(&deps, &[0, 1, 2], 0), vec![0, 1, 2, 0]);
        assert_eq!(cycle_through(&deps, &[0, 1, 2], 1), vec![1, 2, 0, 1]);
        assert_eq!(cycle_through(&deps, &[4], 4), vec![4, 4]);
    }

    #[test]
    fn finds_the_shortest_way_round() {
        // 0 -> 1 -> 2 -> 3 -> 0 and a shortcut 1 -> 0.
        let deps = vec![vec![1], vec![2, 0], vec![3], vec![0]];
        assert_eq!(cycle_through(&deps, &[0, 1, 2, 3], 0), vec![0, 1, 0]);
    }
}
