//! A linearizability checker for key/value register histories (the Wing–Gong algorithm with
//! Lowe's memoization, as in Porcupine and Knossos), partitioned by key.
//!
//! A history is a list of [`Op`]s, each with its invocation and completion times and its
//! outcome. An operation that completed (`Outcome::Ok`) must take effect exactly once between
//! its invocation and completion; one whose outcome is unknown (a timeout, a lost connection)
//! may take effect at any time after its invocation, or never. Operations that definitely
//! failed (refused before they ran) are left out of the history by the caller.
//!
//! The search linearizes one operation at a time. An operation may go next only if it was
//! invoked before every not-yet-linearized completed operation returned (otherwise that one
//! must have gone first). A (set of linearized operations, register value) pair seen before
//! is not explored again, which keeps the search polynomial on the histories real systems
//! produce. A history is linearizable when every completed operation has been placed.
//!
//! Keys are independent registers, so each key's sub-history is checked alone (P-compositionality),
//! which is what makes long histories cheap.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// What an operation did to its key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read the value (`None`: the key did not exist).
    Read(Option<u64>),
    /// Wrote the value.
    Write(u64),
    /// Compare-and-set from `from` to `to`; `swapped` says whether it took.
    Cas {
        /// The value expected.
        from: u64,
        /// The value written if it matched.
        to: u64,
        /// The answer (ignored when the outcome is unknown).
        swapped: bool,
    },
}

/// Whether the client got an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed with the answer recorded in the action.
    Ok,
    /// No answer (timeout, lost connection): it may or may not have taken effect.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client (process) that ran it.
    pub client: u64,
    /// The key.
    pub key: String,
    /// What it did.
    pub action: Action,
    /// Invocation time (any monotonic unit, e.g. microseconds since the start).
    pub invoked: u64,
    /// Completion time (ignored for `Outcome::Unknown`).
    pub completed: u64,
    /// Whether it completed.
    pub outcome: Outcome,
}

/// Why a key's history is not linearizable.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// The longest order of operations the search could place (indexes into `ops`).
    pub placed: Vec<usize>,
    /// The register's value after them.
    pub value: Option<u64>,
    /// The completed operations none of which could go next.
    pub blocked: Vec<usize>,
    /// The key's operations.
    pub ops: Vec<Op>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {:?} is not linearizable: after {} operations the value is {:?}, and none of these can go next:",
            self.key,
            self.placed.len(),
            self.value
        )?;
        for i in &self.blocked {
            let o = &self.ops[*i];
            writeln!(
                f,
                "  client {} {:?} [{}..{}] {:?}",
                o.client, o.action, o.invoked, o.completed, o.outcome
            )?;
        }
        let tail = self.placed.len().saturating_sub(5);
        writeln!(f, "the last operations placed:")?;
        for i in &self.placed[tail..] {
            let o = &self.ops[*i];
            writeln!(
                f,
                "  client {} {:?} [{}..{}]",
                o.client, o.action, o.invoked, o.completed
            )?;
        }
        Ok(())
    }
}

/// Applies `a` to `value`: the new value, or `None` if the recorded answer is impossible.
fn step(value: Option<u64>, a: &Action, outcome: Outcome) -> Option<Option<u64>> {
    match a {
        Action::Read(seen) => (outcome == Outcome::Unknown || *seen == value).then_some(value),
        Action::Write(v) => Some(Some(*v)),
        Action::Cas { from, to, swapped } => {
            let matches = value == Some(*from);
            match outcome {
                Outcome::Unknown => Some(if matches { Some(*to) } else { value }),
                Outcome::Ok if matches && *swapped => Some(Some(*to)),
                Outcome::Ok if !matches && !*swapped => Some(value),
                Outcome::Ok => None,
            }
        }
    }
}

/// Checks every key's sub-history; returns the first violation found.
pub fn check(history: &[Op]) -> Result<(), Box<Violation>> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for o in history {
        // An unanswered read changes nothing and constrains nothing.
        if o.outcome == Outcome::Unknown && matches!(o.action, Action::Read(_)) {
            continue;
        }
        by_key.entry(&o.key).or_default().push(o.clone());
    }
    for (key, ops) in by_key {
        check_key(key, ops)?;
    }
    Ok(())
}

fn check_key(key: &str, ops: Vec<Op>) -> Result<(), Box<Violation>> {
    let n = ops.len();
    let ret = |o: &Op| match o.outcome {
        Outcome::Ok => o.completed,
        Outcome::Unknown => u64::MAX,
    };
    let must = ops.iter().filter(|o| o.outcome == Outcome::Ok).count();
    let words = n.div_ceil(64);
    let mut done = vec![0u64; words];
    let is_done = |d: &[u64], i: usize| d[i / 64] >> (i % 64) & 1 == 1;
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    // The search stack: (op placed, value before it, next candidate to try at this depth).
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut value: Option<u64> = None;
    let mut placed_ok = 0usize;
    let mut next_try = 0usize;
    let mut best: (Vec<usize>, Option<u64>, Vec<usize>) = (Vec::new(), None, Vec::new());
    // Ops sorted by invocation, so candidates are a prefix.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| (ops[*i].invoked, ret(&ops[*i])));
    // Completion times of the completed operations not yet placed (time -> how many).
    let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        *pending.entry(o.completed).or_default() += 1;
    }
    let unpend = |p: &mut BTreeMap<u64, usize>, t: u64| {
        let c = p.get_mut(&t).unwrap();
        *c -= 1;
        if *c == 0 {
            p.remove(&t);
        }
    };
    loop {
        if placed_ok == must {
            return Ok(());
        }
        // The earliest completion among the completed operations not yet placed.
        let horizon = pending.keys().next().copied().unwrap_or(u64::MAX);
        let mut advanced = false;
        let mut k = next_try;
        while k < n {
            let i = order[k];
            k += 1;
            if ops[i].invoked > horizon {
                break;
            }
            if is_done(&done, i) {
                continue;
            }
            let Some(after) = step(value, &ops[i].action, ops[i].outcome) else {
                continue;
            };
            done[i / 64] |= 1 << (i % 64);
            if !seen.insert((done.clone(), after)) {
                done[i / 64] &= !(1 << (i % 64));
                continue;
            }
            stack.push((k, value));
            value = after;
            if ops[i].outcome == Outcome::Ok {
                placed_ok += 1;
                unpend(&mut pending, ops[i].completed);
            }
            next_try = 0;
            advanced = true;
            break;
        }
        if advanced {
            continue;
        }
        if stack.len() >= best.0.len() {
            let placed: Vec<usize> = stack.iter().map(|(k, _)| order[*k - 1]).collect();
            let blocked = order
                .iter()
                .copied()
                .filter(|i| {
                    !is_done(&done, *i)
                        && ops[*i].outcome == Outcome::Ok
                        && ops[*i].invoked <= horizon
                })
                .collect();
            best = (placed, value, blocked);
        }
        // Backtrack: undo the last placement and try its next sibling.
        let Some((k, before)) = stack.pop() else {
            return Err(Box::new(Violation {
                key: key.to_string(),
                placed: best.0,
                value: best.1,
                blocked: best.2,
                ops,
            }));
        };
        let i = order[k - 1];
        done[i / 64] &= !(1 << (i % 64));
        if ops[i].outcome == Outcome::Ok {
            placed_ok -= 1;
            *pending.entry(ops[i].completed).or_default() += 1;
        }
        value = before;
        next_try = k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(client: u64, action: Action, invoked: u64, completed: u64) -> Op {
        Op {
            client,
            key: "x".into(),
            action,
            invoked,
            completed,
            outcome: Outcome::Ok,
        }
    }

    fn cas(from: u64, to: u64, swapped: bool) -> Action {
        Action::Cas { from, to, swapped }
    }

    #[test]
    fn sequential_history_passes() {
        let h = vec![
            op(1, Action::Read(None), 0, 1),
            op(1, Action::Write(1), 2, 3),
            op(2, Action::Read(Some(1)), 4, 5),
            op(2, cas(1, 2, true), 6, 7),
            op(1, cas(1, 3, false), 8, 9),
            op(1, Action::Read(Some(2)), 10, 11),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn stale_read_after_a_completed_write_fails() {
        let h = vec![
            op(1, Action::Write(1), 0, 1),
            op(1, Action::Write(2), 2, 3),
            op(2, Action::Read(Some(1)), 4, 5),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.blocked.len(), 1);
        assert!(v.to_string().contains("Read(Some(1))"), "{v}");
    }

    #[test]
    fn concurrent_operations_may_go_either_way() {
        // The read overlaps the write: it may see the old or the new value.
        for seen in [None, Some(7)] {
            let h = vec![
                op(1, Action::Write(7), 0, 10),
                op(2, Action::Read(seen), 5, 6),
            ];
            check(&h).unwrap();
        }
        // But two later reads may not see new, then old.
        let h = vec![
            op(1, Action::Write(7), 0, 10),
            op(2, Action::Read(Some(7)), 1, 2),
            op(3, Action::Read(None), 3, 4),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_writes_may_or_may_not_take_effect() {
        let mut w = op(1, Action::Write(5), 0, 0);
        w.outcome = Outcome::Unknown;
        for seen in [None, Some(5)] {
            let h = vec![w.clone(), op(2, Action::Read(seen), 100, 101)];
            check(&h).unwrap();
        }
        // It can't take effect before it was invoked.
        let mut late = w.clone();
        late.invoked = 50;
        let h = vec![late, op(2, Action::Read(Some(5)), 10, 20)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn a_lost_acknowledged_cas_fails() {
        let h = vec![
            op(1, Action::Write(1), 0, 1),
            op(1, cas(1, 2, true), 2, 3),
            op(2, cas(1, 3, true), 4, 5),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut a = op(1, Action::Write(1), 0, 10);
        a.key = "a".into();
        let mut b = op(2, Action::Read(None), 5, 6);
        b.key = "b".into();
        check(&[a, b]).unwrap();
    }

    proptest! {
        /// A history made by a real register with overlapping intervals around each
        /// operation's effect point is always accepted.
        #[test]
        fn histories_of_a_real_register_pass(
            steps in proptest::collection::vec((0u64..4, 0u8..3, 0u64..5, 0u64..40, 0u64..40), 1..120)
        ) {
            let mut value: Option<u64> = None;
            let mut h = Vec::new();
            for (t, (client, kind, v, before, after)) in steps.into_iter().enumerate() {
                let at = t as u64 * 20 + 100;
                let action = match kind {
                    0 => Action::Read(value),
                    1 => { value = Some(v); Action::Write(v) }
                    _ => {
                        let from = v % 2;
                        let swapped = value == Some(from);
                        if swapped { value = Some(v); }
                        Action::Cas { from, to: v, swapped }
                    }
                };
                h.push(op(client, action, at - before, at + after));
            }
            prop_assert!(check(&h).is_ok());
            // A completed read of a value nobody wrote is always caught.
            let mut bad = h.clone();
            let last = bad.last().unwrap().completed;
            bad.push(op(9, Action::Read(Some(99)), last + 1, last + 2));
            prop_assert!(check(&bad).is_err());
        }
    }

    #[test]
    fn long_concurrent_history_is_checked_quickly() {
        // 5,000 operations by 8 clients, each overlapping about 8 others.
        let mut value = None;
        let mut h = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for t in 0..5000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = t * 10 + 100;
            let action = if x.is_multiple_of(3) {
                value = Some(t);
                Action::Write(t)
            } else {
                Action::Read(value)
            };
            h.push(op(x % 8, action, at - (x >> 8) % 40, at + (x >> 16) % 40));
        }
        let started = std::time::Instant::now();
        check(&h).unwrap();
        eprintln!("5,000 operations checked in {:?}", started.elapsed());
    }
}
