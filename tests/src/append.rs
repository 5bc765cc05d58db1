//! The checker of the list-append workload (after Jepsen's Elle, for lists).
//!
//! Clients append unique values to lists (one per key) and read them. A transaction may
//! append one value to two keys at once; a read reads every key in one transaction. Every
//! value is unique to the transaction that appends it, so a list's contents tell exactly
//! which appends took effect and in which order. The final lists, read once the faults are
//! over, are the reference order; against them the checker finds:
//!
//! - **duplicates**: a value twice in a list (an append applied twice);
//! - **phantoms**: a value nobody appended to that key;
//! - **lost appends**: an acknowledged append missing from the final list;
//! - **reordering**: a read that is not a prefix of the final list (elements lost, moved or
//!   inserted out of order);
//! - **torn transactions**: a read (or the final state) that holds a two-key append in one
//!   key but not in the other;
//! - **real-time violations** (linearizable operations only): a read that misses an append
//!   acknowledged before the read began, a read shorter than a read that finished before it
//!   began, and two appends in the opposite order of their real-time order.
//!
//! Operations whose outcome is unknown may or may not have happened: they are allowed in
//! the lists (once), not required.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::report::Record;

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Appended `value` to every key of `keys` in one transaction.
    Append {
        /// The keys (one or two).
        keys: Vec<u64>,
        /// The value, unique to this operation.
        value: u64,
    },
    /// Read every key's list in one transaction (empty until answered).
    Read(BTreeMap<u64, Vec<u64>>),
}

/// One operation of an append history.
#[derive(Clone, Debug)]
pub struct Op {
    /// The client that ran it.
    pub client: u64,
    /// What it did.
    pub action: Action,
    /// Invocation time, microseconds since the start.
    pub invoked: u64,
    /// Completion time.
    pub completed: u64,
    /// Whether it was answered.
    pub ok: bool,
    /// Whether its result must respect real time (reads through the leader, all appends);
    /// local reads on a follower need only be a consistent prefix.
    pub linearizable: bool,
}

impl Record for Op {
    fn invoked_us(&self) -> u64 {
        self.invoked
    }
    fn completed_us(&self) -> u64 {
        self.completed
    }
    fn ok(&self) -> bool {
        self.ok
    }
    fn json(&self) -> serde_json::Value {
        let (kind, detail) = match &self.action {
            Action::Append { keys, value } => {
                ("append", serde_json::json!({"keys": keys, "value": value}))
            }
            Action::Read(lists) => (
                "read",
                serde_json::json!(lists
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.len()))
                    .collect::<BTreeMap<_, _>>()),
            ),
        };
        serde_json::json!({
            "client": self.client, "op": kind, "detail": detail,
            "linearizable": self.linearizable,
            "invoked_us": self.invoked, "completed_us": self.completed, "ok": self.ok,
        })
    }
}

/// What a passing history contained.
#[derive(Debug, Default)]
pub struct Summary {
    /// Appends acknowledged.
    pub appends_ok: usize,
    /// Appends with an unknown outcome.
    pub unknown: usize,
    /// Appends with an unknown outcome that took effect after all.
    pub unknown_applied: usize,
    /// Reads checked.
    pub reads: usize,
    /// The longest final list.
    pub longest: usize,
}

fn show(o: &Op) -> String {
    let what = match &o.action {
        Action::Append { keys, value } => format!("append {value} to {keys:?}"),
        Action::Read(l) => format!(
            "read {:?}",
            l.iter()
                .map(|(k, v)| format!("{k}: {} values, last {:?}", v.len(), v.last()))
                .collect::<Vec<_>>()
        ),
    };
    format!(
        "client {} {what} [{} .. {} us{}]",
        o.client,
        o.invoked,
        o.completed,
        if o.ok { "" } else { ", unknown outcome" }
    )
}

/// Checks `history` against the `finals` lists (read after the faults). On failure,
/// returns every anomaly found (at most 20), each naming the operations involved.
pub fn check(history: &[Op], finals: &BTreeMap<u64, Vec<u64>>) -> Result<Summary, Vec<String>> {
    let mut bad = Vec::new();
    let mut summary = Summary::default();
    // value -> (the append, its keys)
    let mut appends: HashMap<u64, &Op> = HashMap::new();
    for o in history {
        if let Action::Append { value, .. } = &o.action {
            appends.insert(*value, o);
        }
    }
    let keys_of = |v: u64| match appends.get(&v).map(|o| &o.action) {
        Some(Action::Append { keys, .. }) => keys.clone(),
        _ => Vec::new(),
    };
    // Positions in the final lists.
    let mut pos: HashMap<(u64, u64), usize> = HashMap::new();
    for (k, list) in finals {
        summary.longest = summary.longest.max(list.len());
        let mut seen = HashSet::new();
        for (i, v) in list.iter().enumerate() {
            if !seen.insert(*v) {
                bad.push(format!(
                    "duplicate: {v} appears twice in key {k}'s final list"
                ));
            }
            match appends.get(v) {
                None => bad.push(format!("phantom: key {k} holds {v}, which nobody appended")),
                Some(o) if !keys_of(*v).contains(k) => bad.push(format!(
                    "phantom: key {k} holds {v}, appended to other keys by {}",
                    show(o)
                )),
                _ => {}
            }
            pos.insert((*k, *v), i);
        }
    }
    // Acknowledged appends are all there; unknown ones, if there, are whole.
    for o in history {
        let Action::Append { keys, value } = &o.action else {
            continue;
        };
        let present: Vec<bool> = keys
            .iter()
            .map(|k| pos.contains_key(&(*k, *value)))
            .collect();
        if o.ok {
            summary.appends_ok += 1;
            for (k, p) in keys.iter().zip(&present) {
                if !p {
                    bad.push(format!(
                        "lost: {} was acknowledged but key {k}'s final list lacks it",
                        show(o)
                    ));
                }
            }
        } else {
            summary.unknown += 1;
            if present.iter().any(|p| *p) {
                summary.unknown_applied += 1;
            }
        }
        if present.iter().any(|p| *p) && !present.iter().all(|p| *p) {
            bad.push(format!(
                "torn: the final lists hold only part of {}",
                show(o)
            ));
        }
    }
    // Every multi-key append in the final lists, by its positions there.
    let mut spans: Vec<(u64, Vec<(u64, usize)>)> = Vec::new();
    for (v, o) in &appends {
        if let Action::Append { keys, .. } = &o.action {
            let at: Vec<(u64, usize)> = keys
                .iter()
                .filter_map(|k| pos.get(&(*k, *v)).map(|p| (*k, *p)))
                .collect();
            if keys.len() > 1 && at.len() == keys.len() {
                spans.push((*v, at));
            }
        }
    }
    // Reads: prefixes of the final lists, and so (given the prefix) a multi-key append is
    // whole when its position is inside every key's prefix or outside all of them.
    for o in history.iter().filter(|o| o.ok) {
        let Action::Read(lists) = &o.action else {
            continue;
        };
        summary.reads += 1;
        let mut prefixes = true;
        for (k, list) in lists {
            let fin = finals.get(k).map(Vec::as_slice).unwrap_or(&[]);
            if fin.starts_with(list) {
                continue;
            }
            if let Some(i) = (0..list.len()).find(|i| fin.get(*i) != Some(&list[*i])) {
                prefixes = false;
                bad.push(format!(
                    "reordered or lost: {} has {:?} at position {i} of key {k}, the final list {:?}",
                    show(o),
                    list[i],
                    fin.get(i)
                ));
            }
        }
        if !prefixes {
            continue;
        }
        let seen = |k: u64, p: usize| lists.get(&k).map(|l| p < l.len());
        for (v, at) in &spans {
            let (mut yes, mut no) = (false, false);
            for (k, p) in at {
                match seen(*k, *p) {
                    Some(true) => yes = true,
                    Some(false) => no = true,
                    None => {}
                }
            }
            if yes && no {
                bad.push(format!(
                    "torn: {} sees only part of {}",
                    show(o),
                    appends.get(v).map(|a| show(a)).unwrap_or_default()
                ));
            }
        }
    }
    // Real time, per key: sort the acknowledged appends by completion and keep the
    // furthest final position reached so far.
    for k in finals.keys() {
        let mut done: Vec<(u64, usize, &Op)> = history
            .iter()
            .filter(|o| o.ok && o.linearizable)
            .filter_map(|o| match &o.action {
                Action::Append { value, .. } => {
                    pos.get(&(*k, *value)).map(|p| (o.completed, *p, o))
                }
                _ => None,
            })
            .collect();
        done.sort_by_key(|d| d.0);
        let mut furthest: Vec<(u64, usize, &Op)> = Vec::with_capacity(done.len());
        for d in done {
            match furthest.last() {
                Some(f) if f.1 >= d.1 => furthest.push((d.0, f.1, f.2)),
                _ => furthest.push(d),
            }
        }
        // The furthest position acknowledged before time t.
        let before = |t: u64| {
            let i = furthest.partition_point(|f| f.0 < t);
            i.checked_sub(1).map(|i| furthest[i])
        };
        for o in history.iter().filter(|o| o.ok && o.linearizable) {
            match &o.action {
                Action::Read(lists) => {
                    let Some(list) = lists.get(k) else { continue };
                    if let Some((_, p, a)) = before(o.invoked) {
                        if list.len() <= p {
                            bad.push(format!(
                                "stale read: {} misses {} (position {p} of key {k}), acknowledged before the read began",
                                show(o),
                                show(a)
                            ));
                        }
                    }
                }
                Action::Append { keys, value } if keys.contains(k) => {
                    let Some(&mine) = pos.get(&(*k, *value)) else {
                        continue; // lost: reported above
                    };
                    if let Some((_, p, a)) = before(o.invoked) {
                        if p > mine {
                            bad.push(format!(
                                "real-time order: {} (position {mine} of key {k}) comes before {} (position {p}), which was acknowledged before it began",
                                show(o),
                                show(a)
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    // Reads never go back in time: a read that began after another finished is no shorter.
    let mut reads: Vec<&Op> = history
        .iter()
        .filter(|o| o.ok && o.linearizable && matches!(o.action, Action::Read(_)))
        .collect();
    reads.sort_by_key(|o| o.completed);
    for k in finals.keys() {
        let len = |o: &Op| match &o.action {
            Action::Read(l) => l.get(k).map_or(0, Vec::len),
            _ => 0,
        };
        let mut longest: Option<&Op> = None;
        let mut j = 0;
        let mut by_invoked = reads.clone();
        by_invoked.sort_by_key(|o| o.invoked);
        for o in by_invoked {
            while j < reads.len() && reads[j].completed < o.invoked {
                if longest.is_none_or(|l| len(reads[j]) > len(l)) {
                    longest = Some(reads[j]);
                }
                j += 1;
            }
            if let Some(l) = longest {
                if len(o) < len(l) {
                    bad.push(format!(
                        "went back in time: {} sees {} values of key {k}, after {} saw {}",
                        show(o),
                        len(o),
                        show(l),
                        len(l)
                    ));
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(summary)
    } else {
        bad.truncate(20);
        Err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(client: u64, keys: &[u64], value: u64, t: (u64, u64), ok: bool) -> Op {
        Op {
            client,
            action: Action::Append {
                keys: keys.to_vec(),
                value,
            },
            invoked: t.0,
            completed: t.1,
            ok,
            linearizable: true,
        }
    }

    fn read(client: u64, lists: &[(u64, &[u64])], t: (u64, u64)) -> Op {
        Op {
            client,
            action: Action::Read(lists.iter().map(|(k, v)| (*k, v.to_vec())).collect()),
            invoked: t.0,
            completed: t.1,
            ok: true,
            linearizable: true,
        }
    }

    fn finals(l: &[(u64, &[u64])]) -> BTreeMap<u64, Vec<u64>> {
        l.iter().map(|(k, v)| (*k, v.to_vec())).collect()
    }

    fn fails(h: &[Op], f: &[(u64, &[u64])], what: &str) {
        let e = check(h, &finals(f)).expect_err("must fail");
        assert!(e.iter().any(|m| m.starts_with(what)), "{what}: {e:?}");
    }

    #[test]
    fn a_good_history_passes() {
        let h = vec![
            append(1, &[0], 1, (0, 10), true),
            append(2, &[0, 1], 2, (5, 20), true),
            read(3, &[(0, &[1]), (1, &[])], (6, 8)),
            read(3, &[(0, &[1, 2]), (1, &[2])], (21, 30)),
            append(1, &[1], 3, (25, 40), false),
        ];
        let s = check(&h, &finals(&[(0, &[1, 2]), (1, &[2, 3])])).unwrap();
        assert_eq!((s.appends_ok, s.unknown_applied, s.reads), (2, 1, 2));
    }

    #[test]
    fn a_long_history_is_checked_quickly() {
        // 6,000 appends (a third to two keys) and 4,000 reads of 6 keys, one at a time.
        let mut lists: BTreeMap<u64, Vec<u64>> = (0..6).map(|k| (k, Vec::new())).collect();
        let mut h = Vec::new();
        for i in 0..10_000u64 {
            let t = (i * 10, i * 10 + 5);
            if i % 5 < 3 {
                let keys = if i % 3 == 0 {
                    vec![i % 6, (i + 1) % 6]
                } else {
                    vec![i % 6]
                };
                for k in &keys {
                    lists.get_mut(k).unwrap().push(i);
                }
                h.push(append(1, &keys, i, t, true));
            } else {
                let l: Vec<(u64, Vec<u64>)> = lists.iter().map(|(k, v)| (*k, v.clone())).collect();
                let l: Vec<(u64, &[u64])> = l.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                h.push(read(2, &l, t));
            }
        }
        let started = std::time::Instant::now();
        let s = check(&h, &lists).unwrap();
        assert_eq!((s.appends_ok, s.reads), (6_000, 4_000));
        eprintln!("checked 10,000 operations in {:?}", started.elapsed());
    }

    #[test]
    fn anomalies_are_found() {
        let a = append(1, &[0], 1, (0, 10), true);
        let b = append(2, &[0], 2, (20, 30), true);
        fails(std::slice::from_ref(&a), &[(0, &[])], "lost");
        fails(std::slice::from_ref(&a), &[(0, &[1, 1])], "duplicate");
        fails(std::slice::from_ref(&a), &[(0, &[1, 9])], "phantom");
        fails(&[a.clone(), b.clone()], &[(0, &[2, 1])], "real-time order");
        fails(
            &[a.clone(), b.clone(), read(3, &[(0, &[2])], (40, 50))],
            &[(0, &[1, 2])],
            "reordered or lost",
        );
        fails(
            &[a.clone(), read(3, &[(0, &[])], (11, 12))],
            &[(0, &[1])],
            "stale read",
        );
        let two = append(1, &[0, 1], 5, (0, 10), false);
        fails(std::slice::from_ref(&two), &[(0, &[5]), (1, &[])], "torn");
        fails(
            &[two, read(3, &[(0, &[5]), (1, &[])], (11, 12))],
            &[(0, &[5]), (1, &[5])],
            "torn",
        );
        let slow = append(1, &[0], 1, (0, 100), true);
        fails(
            &[
                slow,
                read(3, &[(0, &[1])], (10, 20)),
                read(4, &[(0, &[])], (30, 40)),
            ],
            &[(0, &[1])],
            "went back in time",
        );
    }
}
