//! Role planning: which one configuration change brings the cluster closer to its targets.
//!
//! Every member is a **voter** (a Raft voter), a **standby** (a Raft learner: replicates, does
//! not vote) or a **spare** (in the member registry, not in the Raft configuration). The
//! leader calls [`plan`] every round with what it sees and applies at most one change, then
//! waits for it to be applied before planning again. One change at a time is Raft's
//! single-server change: each configuration overlaps the previous one in a majority, so no
//! change can lose quorum on its own, and raft-rs refuses a second one while one is pending.
//!
//! Invariants kept by [`plan`] (each checked by the tests below):
//! - The leader is never demoted.
//! - A voter is only promoted from a standby that is online and caught up: a voter that must
//!   first catch up would slow every commit.
//! - An online voter is demoted only when there are more voters than the target; an offline
//!   voter only once a replacement has made the voters exceed the target. So a dead voter
//!   with no replacement stays a voter (the cluster then reports that it is not HA) rather
//!   than shrinking the quorum.
//! - Promotions prefer failure domains not yet represented among the online voters (or,
//!   for standbys, among online voters and standbys), then lower weight, then lower id; demotions pick
//!   offline nodes first, then the reverse order.

use std::collections::BTreeSet;

/// A member's place in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Raft voter.
    Voter,
    /// Raft learner.
    Standby,
    /// Registered, not in the Raft configuration.
    Spare,
}

impl Role {
    /// The role of `id` in a Raft configuration of `voters` and `learners`.
    pub fn of(id: u64, voters: &[u64], learners: &[u64]) -> Role {
        if voters.contains(&id) {
            Role::Voter
        } else if learners.contains(&id) {
            Role::Standby
        } else {
            Role::Spare
        }
    }

    /// "voter", "standby" or "spare".
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Standby => "standby",
            Role::Spare => "spare",
        }
    }
}

/// How many voters and standbys the cluster keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    /// Voters (odd; default 3).
    pub voters: usize,
    /// Standbys (default 3).
    pub standbys: usize,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            voters: 3,
            standbys: 3,
        }
    }
}

/// What the leader knows of one member when it plans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Node id.
    pub id: u64,
    /// Current role.
    pub role: Role,
    /// Answered the leader's recent probes.
    pub online: bool,
    /// Its log is close enough to the leader's to vote without slowing commits.
    pub caught_up: bool,
    /// Failure domain ("" = none).
    pub domain: String,
    /// Lower is preferred for promotion.
    pub weight: u32,
}

/// One configuration change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The member that changes role.
    pub id: u64,
    /// Its role before.
    pub from: Role,
    /// Its role after.
    pub to: Role,
    /// Why (the rule of [`plan`] that chose it, or an operator's command).
    pub reason: Reason,
}

/// Why a member changes role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Fewer voters online than the target allows (a voter is offline or missing).
    TooFewVoters,
    /// An offline voter leaves the configuration (its replacement came in).
    VoterOffline,
    /// More voters than the target (or than fault tolerance needs): one steps down.
    TooManyVoters,
    /// Fewer standbys online than the target.
    TooFewStandbys,
    /// More standbys than the target.
    TooManyStandbys,
    /// An offline standby makes room for an online spare.
    StandbyOffline,
    /// `raftsql remove-node` or `raftsql leave`.
    Removed,
}

impl Reason {
    /// A short description for `cluster show`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooFewVoters => "too few voters online",
            Reason::VoterOffline => "voter offline, replaced",
            Reason::TooManyVoters => "more voters than needed",
            Reason::TooFewStandbys => "too few standbys online",
            Reason::TooManyStandbys => "more standbys than needed",
            Reason::StandbyOffline => "standby offline, an online spare stands in",
            Reason::Removed => "removed",
        }
    }
}

/// The next change, if any. `leader` is the planning node (it is never demoted).
pub fn plan(members: &[MemberView], leader: u64, targets: Targets) -> Option<Change> {
    let count = |role: Role, online_only: bool| {
        members
            .iter()
            .filter(|m| m.role == role && (m.online || !online_only))
            .count()
    };
    let voters = count(Role::Voter, false);
    let online_voters = count(Role::Voter, true);
    let standbys = count(Role::Standby, false);
    let online_standbys = count(Role::Standby, true);
    let online = members.iter().filter(|m| m.online).count();
    // As many voters as the target allows and online nodes can fill, kept odd.
    let mut want_voters = targets.voters.min(online).max(1);
    if want_voters % 2 == 0 {
        want_voters -= 1;
    }
    let change = |m: &MemberView, to: Role, reason: Reason| Change {
        id: m.id,
        from: m.role,
        to,
        reason,
    };

    // 1. Too few voters online: promote a caught-up standby; else start a spare on the way.
    if online_voters < want_voters {
        let taken = domains(members, &[Role::Voter]);
        if let Some(m) = best(members, Role::Standby, &taken, |m| m.caught_up) {
            return Some(change(m, Role::Voter, Reason::TooFewVoters));
        }
        let taken = domains(members, &[Role::Voter, Role::Standby]);
        if online_standbys == 0 {
            if let Some(m) = best(members, Role::Spare, &taken, |_| true) {
                return Some(change(m, Role::Standby, Reason::TooFewVoters));
            }
        }
    }
    // 2. Too many voters (a replacement came in, or a node came back): demote one, offline
    //    first. An offline voter leaves the configuration; an online one becomes a standby.
    //    Also when every voter is online but there are more than wanted (e.g. an even
    //    number): a voter that adds no fault tolerance only slows commits.
    if voters > targets.voters || (voters == online_voters && online_voters > want_voters) {
        if let Some(m) = worst(members, Role::Voter, leader) {
            let (to, why) = if m.online {
                (Role::Standby, Reason::TooManyVoters)
            } else {
                (Role::Spare, Reason::VoterOffline)
            };
            return Some(change(m, to, why));
        }
    }
    // 3. Too few standbys online: promote a spare.
    if online_standbys < targets.standbys {
        let taken = domains(members, &[Role::Voter, Role::Standby]);
        if let Some(m) = best(members, Role::Spare, &taken, |_| true) {
            return Some(change(m, Role::Standby, Reason::TooFewStandbys));
        }
    }
    // 4. Too many standbys: demote one to spare, offline first (not while one is needed on
    //    its way to becoming a voter).
    if standbys > targets.standbys && online_voters >= want_voters {
        if let Some(m) = worst(members, Role::Standby, leader) {
            return Some(change(m, Role::Spare, Reason::TooManyStandbys));
        }
    }
    // 5. An offline standby while an online spare could stand in: swap them (the spare is
    //    promoted by rule 3 once this one is out).
    if standbys >= targets.standbys && online_standbys < standbys {
        let spare_online = members.iter().any(|m| m.role == Role::Spare && m.online);
        if spare_online {
            if let Some(m) = members
                .iter()
                .filter(|m| m.role == Role::Standby && !m.online)
                .min_by_key(|m| m.id)
            {
                return Some(change(m, Role::Spare, Reason::StandbyOffline));
            }
        }
    }
    None
}

/// Failure domains (non-empty) of the online members with one of `roles`. An offline
/// member's domain does not count: it is the domain that just lost its copy.
fn domains<'a>(members: &'a [MemberView], roles: &[Role]) -> BTreeSet<&'a str> {
    members
        .iter()
        .filter(|m| roles.contains(&m.role) && m.online && !m.domain.is_empty())
        .map(|m| m.domain.as_str())
        .collect()
}

/// The online member of `role` most preferred for promotion among those passing `ok`.
fn best<'a>(
    members: &'a [MemberView],
    role: Role,
    taken: &BTreeSet<&str>,
    ok: impl Fn(&MemberView) -> bool,
) -> Option<&'a MemberView> {
    members
        .iter()
        .filter(|m| m.role == role && m.online && ok(m))
        .min_by_key(|m| {
            let new_domain = !m.domain.is_empty() && !taken.contains(m.domain.as_str());
            (!new_domain, m.weight, m.id)
        })
}

/// The member of `role` (never `leader`) to demote first: offline ones, then the least
/// preferred (a domain shared with another member of the role, higher weight, higher id).
fn worst(members: &[MemberView], role: Role, leader: u64) -> Option<&MemberView> {
    let same_role: Vec<&MemberView> = members.iter().filter(|m| m.role == role).collect();
    same_role
        .iter()
        .filter(|m| m.id != leader)
        .max_by_key(|m| {
            let shared = !m.domain.is_empty()
                && same_role
                    .iter()
                    .any(|o| o.id != m.id && o.domain == m.domain);
            (!m.online, shared, m.weight, m.id)
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(id: u64, role: Role, online: bool) -> MemberView {
        MemberView {
            id,
            role,
            online,
            caught_up: true,
            domain: String::new(),
            weight: 0,
        }
    }

    /// Applies plans until none is left (at most 50 steps); returns the final members.
    fn settle(mut ms: Vec<MemberView>, leader: u64, t: Targets) -> Vec<MemberView> {
        for _ in 0..50 {
            match plan(&ms, leader, t) {
                Some(c) => {
                    let x = ms.iter_mut().find(|x| x.id == c.id).unwrap();
                    assert_eq!(x.role, c.from);
                    x.role = c.to;
                }
                None => return ms,
            }
        }
        panic!("plans did not settle: {ms:?}");
    }

    fn roles(ms: &[MemberView]) -> Vec<Role> {
        ms.iter().map(|m| m.role).collect()
    }

    #[test]
    fn five_nodes_settle_to_three_voters_two_standbys() {
        let ms = vec![
            m(1, Role::Voter, true),
            m(2, Role::Spare, true),
            m(3, Role::Spare, true),
            m(4, Role::Spare, true),
            m(5, Role::Spare, true),
        ];
        let end = settle(ms, 1, Targets::default());
        let voters = end.iter().filter(|m| m.role == Role::Voter).count();
        let standbys = end.iter().filter(|m| m.role == Role::Standby).count();
        assert_eq!((voters, standbys), (3, 2), "{end:?}");
    }

    #[test]
    fn a_dead_voter_is_replaced_by_a_standby_then_dropped() {
        let ms = vec![
            m(1, Role::Voter, true),
            m(2, Role::Voter, true),
            m(3, Role::Voter, false),
            m(4, Role::Standby, true),
        ];
        let first = plan(&ms, 1, Targets::default()).unwrap();
        assert_eq!(
            first,
            Change {
                id: 4,
                from: Role::Standby,
                to: Role::Voter,
                reason: Reason::TooFewVoters,
            }
        );
        let end = settle(ms, 1, Targets::default());
        assert_eq!(
            roles(&end),
            vec![Role::Voter, Role::Voter, Role::Spare, Role::Voter]
        );
    }

    #[test]
    fn the_domain_that_lost_its_voter_gets_it_back() {
        // Voter 3 (zone c) died; standby 5 is in zone c, standby 4 in zone b (which voter 2
        // already covers) with a lower id and weight.
        let mut ms = vec![
            m(1, Role::Voter, true),
            m(2, Role::Voter, true),
            m(3, Role::Voter, false),
            m(4, Role::Standby, true),
            m(5, Role::Standby, true),
        ];
        for (x, d) in ms.iter_mut().zip(["a", "b", "c", "b", "c"]) {
            x.domain = d.into();
        }
        ms[4].weight = 9;
        assert_eq!(
            plan(&ms, 1, Targets::default()),
            Some(Change {
                id: 5,
                from: Role::Standby,
                to: Role::Voter,
                reason: Reason::TooFewVoters,
            })
        );
    }

    #[test]
    fn a_dead_voter_without_replacement_stays() {
        let ms = vec![
            m(1, Role::Voter, true),
            m(2, Role::Voter, true),
            m(3, Role::Voter, false),
        ];
        assert_eq!(plan(&ms, 1, Targets::default()), None);
    }

    #[test]
    fn a_lagging_standby_is_not_made_a_voter() {
        let mut ms = vec![
            m(1, Role::Voter, true),
            m(2, Role::Voter, true),
            m(3, Role::Voter, false),
            m(4, Role::Standby, true),
        ];
        ms[3].caught_up = false;
        assert_eq!(plan(&ms, 1, Targets::default()), None);
    }

    #[test]
    fn new_failure_domains_are_preferred() {
        let mut ms = vec![
            m(1, Role::Voter, true),
            m(2, Role::Voter, true),
            m(3, Role::Standby, true),
            m(4, Role::Standby, true),
        ];
        for (i, d) in ["a", "b", "a", "c"].iter().enumerate() {
            ms[i].domain = d.to_string();
        }
        assert_eq!(plan(&ms, 1, Targets::default()).unwrap().id, 4);
        ms[3].domain = "b".into();
        ms[2].weight = 5;
        // No new domain: lower weight wins.
        assert_eq!(plan(&ms, 1, Targets::default()).unwrap().id, 4);
    }

    proptest! {
        /// Whatever the cluster looks like: the leader is never demoted; a standby becomes
        /// a voter only online and caught up; an online voter is demoted only above target;
        /// settling ends with at most the target of voters (or the voters there were) and an
        /// odd number of online voters whenever enough nodes are online.
        #[test]
        fn plans_keep_the_invariants(
            spec in proptest::collection::vec((0u8..3, any::<bool>(), any::<bool>(), 0u8..3, 0u32..3), 1..8),
            tv in prop_oneof![Just(1usize), Just(3), Just(5)],
            ts in 0usize..4,
        ) {
            let mut ms: Vec<MemberView> = spec.iter().enumerate().map(|(i, (r, on, cu, d, w))| MemberView {
                id: i as u64 + 1,
                role: [Role::Voter, Role::Standby, Role::Spare][*r as usize],
                online: *on,
                caught_up: *cu,
                domain: ["", "a", "b"][*d as usize].to_string(),
                weight: *w,
            }).collect();
            // The leader is an online voter.
            ms[0].role = Role::Voter;
            ms[0].online = true;
            ms[0].caught_up = true;
            let t = Targets { voters: tv, standbys: ts };
            for _ in 0..60 {
                let Some(c) = plan(&ms, 1, t) else { break };
                prop_assert_ne!(c.id, 1, "leader demoted");
                let x = ms.iter_mut().find(|x| x.id == c.id).unwrap();
                prop_assert_eq!(x.role, c.from);
                if c.to == Role::Voter {
                    prop_assert!(x.online && x.caught_up && x.role == Role::Standby);
                }
                x.role = c.to;
            }
            prop_assert!(plan(&ms, 1, t).is_none(), "did not settle: {:?}", ms);
            let online_voters = ms.iter().filter(|m| m.role == Role::Voter && m.online).count();
            let voters = ms.iter().filter(|m| m.role == Role::Voter).count();
            prop_assert!(online_voters >= 1);
            prop_assert!(voters <= tv.max(online_voters), "{:?}", ms);
        }
    }
}
