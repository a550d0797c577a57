//! The checker: reads the history and the final state and says whether anything went wrong.
//!
//! - Nothing acknowledged is missing: every acknowledged create exists, every acknowledged
//!   grab or open is stored with the same share index and amount.
//! - A share index belongs to at most one user; a user holds at most one share; shares
//!   grabbed ≤ shares; a fully opened packet's amounts sum exactly to its total.
//! - Grabs are linearizable per packet. A packet's grabs hand out indexes from one counter,
//!   so a history is linearizable exactly when (1) a grab that took its share after another
//!   grab completed got a higher index, and (2) no grab that started after a "sold out"
//!   answer took a new share. "Took its share after" is only claimed when the user had no
//!   earlier attempt on the packet (an earlier attempt with an unknown outcome may have taken
//!   the share already). Each packet is small, so this is checked pairwise.
//! - Replicas agree (same state digest at the same applied index), and reconciliation is
//!   clean (checked by the runner, reported here).
//!
//! On a violation the checker prints the smallest window of the packet's history that shows
//! it: the operations overlapping the two involved.

use std::collections::BTreeMap;
use std::collections::HashMap;

use redpacket_client::Packet;

use super::history::Event;
use super::history::Op;
use super::history::Outcome;

#[derive(Debug, Default)]
pub struct Verdict {
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn window(events: &[Event], packet_id: &str, from: u64, to: u64) -> String {
    let mut lines = Vec::new();
    for e in events.iter().filter(|e| e.op.packet_id() == Some(packet_id) && e.end_ms >= from && e.start_ms <= to) {
        lines.push(format!("    [{:>6}..{:>6}] {:<10} {:?} -> {:?}", e.start_ms, e.end_ms, e.process, e.op, e.outcome));
    }
    for e in events.iter().filter(|e| matches!(e.op, Op::Nemesis { .. }) && e.end_ms >= from && e.start_ms <= to) {
        lines.push(format!("    [{:>6}..{:>6}] nemesis    {:?}", e.start_ms, e.end_ms, e.op));
    }
    lines.join("\n")
}

/// The share index an acknowledged grab-like operation returned.
fn index_of(e: &Event) -> Option<u32> {
    match (&e.op, &e.outcome) {
        (Op::Grab { .. } | Op::GrabOpen { .. }, Outcome::Grabbed { share_index } | Outcome::Opened { share_index, .. }) => Some(*share_index),
        _ => None,
    }
}

fn is_sold_out(e: &Event) -> bool {
    matches!((&e.op, &e.outcome), (Op::Grab { .. } | Op::GrabOpen { .. }, Outcome::Fail { reason }) if reason.starts_with("sold out"))
}

/// Checks the history against the final state of every packet it mentions.
pub fn check(events: &[Event], packets: &HashMap<String, Packet>) -> Verdict {
    let mut v = Verdict::default();
    for e in events {
        if let Outcome::Created { packet_id } = &e.outcome
            && !packets.contains_key(packet_id)
        {
            v.problems.push(format!("acknowledged create of {packet_id} at {} ms is missing", e.end_ms));
        }
    }
    let mut by_packet: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        if let Some(id) = e.op.packet_id() {
            by_packet.entry(id).or_default().push(e);
        }
    }
    for (id, ops) in by_packet {
        let Some(p) = packets.get(id) else {
            if ops.iter().any(|e| index_of(e).is_some()) {
                v.problems.push(format!("packet {id} had acknowledged grabs but does not exist"));
            }
            continue;
        };
        check_state(&mut v, id, p, &ops);
        check_linearizable(&mut v, events, id, p, &ops);
    }
    v
}

fn check_state(v: &mut Verdict, id: &str, p: &Packet, ops: &[&Event]) {
    let claims: HashMap<&str, &redpacket_client::PacketClaim> = p.claims.iter().map(|c| (c.user.as_str(), c)).collect();
    let mut indexes: Vec<u32> = p.claims.iter().map(|c| c.share_index).collect();
    indexes.sort_unstable();
    let before = indexes.len();
    indexes.dedup();
    if indexes.len() != before {
        v.problems.push(format!("packet {id}: a share index is held by two users"));
    }
    if indexes.iter().any(|i| *i >= p.shares) || p.shares_grabbed > p.shares || p.shares_grabbed as usize != p.claims.len() {
        v.problems.push(format!("packet {id}: {} shares grabbed of {} ({} claims)", p.shares_grabbed, p.shares, p.claims.len()));
    }
    let opened: u64 = p.claims.iter().filter_map(|c| c.amount_cents).sum();
    if opened > p.total_cents || (p.shares_opened == p.shares && opened != p.total_cents) {
        v.problems.push(format!("packet {id}: opened shares sum to {opened} of {} ({} of {} opened)", p.total_cents, p.shares_opened, p.shares));
    }
    for e in ops {
        let (user, index, amount) = match (&e.op, &e.outcome) {
            (op, Outcome::Grabbed { share_index }) => (op.user(), *share_index, None),
            (op, Outcome::Opened { share_index, amount }) => (op.user(), *share_index, Some(*amount)),
            _ => continue,
        };
        let Some(user) = user else { continue };
        match claims.get(user) {
            None => v.problems.push(format!("packet {id}: {user}'s acknowledged share #{index} is missing")),
            Some(c) if c.share_index != index => {
                v.problems.push(format!("packet {id}: {user} was told share #{index}, stored #{}", c.share_index))
            }
            Some(c) if amount.is_some() && c.amount_cents != amount => {
                v.problems.push(format!("packet {id}: {user} was told {amount:?} cents, stored {:?}", c.amount_cents))
            }
            _ => {}
        }
    }
    if ops.iter().any(|e| is_sold_out(e)) && p.shares_grabbed != p.shares {
        v.problems.push(format!("packet {id}: answered sold out but only {} of {} shares are taken", p.shares_grabbed, p.shares));
    }
}

fn check_linearizable(v: &mut Verdict, events: &[Event], id: &str, _p: &Packet, ops: &[&Event]) {
    // When each user's first attempt on this packet started.
    let mut first_attempt: HashMap<&str, u64> = HashMap::new();
    for e in ops {
        if let (Op::Grab { .. } | Op::GrabOpen { .. } | Op::Open { .. }, Some(user)) = (&e.op, e.op.user()) {
            let t = first_attempt.entry(user).or_insert(e.start_ms);
            *t = (*t).min(e.start_ms);
        }
    }
    let acked: Vec<(&Event, u32)> = ops.iter().filter_map(|e| index_of(e).map(|i| (*e, i))).collect();
    for (a, ia) in &acked {
        for (b, ib) in &acked {
            let (Some(ua), Some(ub)) = (a.op.user(), b.op.user()) else { continue };
            if ua == ub {
                if ia != ib {
                    v.problems.push(format!("packet {id}: {ua} was given shares #{ia} and #{ib}\n{}", window(events, id, a.start_ms.min(b.start_ms), a.end_ms.max(b.end_ms))));
                }
                continue;
            }
            // b's user first tried after a completed: b's share was taken after a's.
            if a.end_ms < first_attempt[ub] && ia >= ib {
                v.problems.push(format!(
                    "packet {id}: not linearizable: {ua} got #{ia} by {} ms, yet {ub}, who first tried at {} ms, got #{ib}\n{}",
                    a.end_ms, first_attempt[ub], window(events, id, a.start_ms, b.end_ms)
                ));
            }
        }
    }
    for s in ops.iter().filter(|e| is_sold_out(e)) {
        for (b, ib) in &acked {
            let Some(ub) = b.op.user() else { continue };
            if s.end_ms < first_attempt[ub] {
                v.problems.push(format!(
                    "packet {id}: not linearizable: sold out at {} ms, yet {ub}, who first tried at {} ms, got a new share #{ib}\n{}",
                    s.end_ms, first_attempt[ub], window(events, id, s.start_ms, b.end_ms)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(process: &str, start: u64, end: u64, op: Op, outcome: Outcome) -> Event {
        Event { process: process.into(), start_ms: start, end_ms: end, op, outcome }
    }

    fn grab(user: &str) -> Op {
        Op::Grab { packet_id: "p".into(), user: user.into() }
    }

    fn packet(claims: &[(&str, u32)], shares: u32) -> Packet {
        Packet {
            packet_id: "p".into(),
            shares,
            total_cents: 100,
            shares_grabbed: claims.len() as u32,
            claims: claims
                .iter()
                .map(|(u, i)| redpacket_client::PacketClaim { user: (*u).into(), share_index: *i, ..Default::default() })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_linearizable_history_passes() {
        let events = vec![
            ev("c1", 0, 10, grab("a"), Outcome::Grabbed { share_index: 0 }),
            ev("c2", 5, 15, grab("b"), Outcome::Grabbed { share_index: 1 }),
            ev("c3", 20, 30, grab("c"), Outcome::Fail { reason: "sold out: p".into() }),
        ];
        let packets = HashMap::from([("p".to_string(), packet(&[("a", 0), ("b", 1)], 2))]);
        assert!(check(&events, &packets).ok());
    }

    #[test]
    fn an_index_out_of_real_time_order_is_caught_with_its_window() {
        let events = vec![
            ev("c1", 0, 10, grab("a"), Outcome::Grabbed { share_index: 1 }),
            ev("c2", 20, 30, grab("b"), Outcome::Grabbed { share_index: 0 }),
        ];
        let packets = HashMap::from([("p".to_string(), packet(&[("a", 1), ("b", 0)], 2))]);
        let v = check(&events, &packets);
        assert!(!v.ok());
        assert!(v.problems[0].contains("not linearizable") && v.problems[0].contains("c2"), "{:?}", v.problems);
    }

    #[test]
    fn a_share_after_sold_out_and_a_lost_grab_are_caught() {
        let events = vec![
            ev("c1", 0, 10, grab("a"), Outcome::Fail { reason: "sold out: p".into() }),
            ev("c2", 20, 30, grab("b"), Outcome::Grabbed { share_index: 0 }),
            ev("c3", 40, 50, grab("c"), Outcome::Grabbed { share_index: 1 }),
        ];
        let packets = HashMap::from([("p".to_string(), packet(&[("b", 0)], 2))]);
        let v = check(&events, &packets);
        assert!(v.problems.iter().any(|p| p.contains("sold out at")), "{:?}", v.problems);
        assert!(v.problems.iter().any(|p| p.contains("c's acknowledged share #1 is missing")), "{:?}", v.problems);
    }

    #[test]
    fn an_unknown_earlier_attempt_excuses_a_lower_index() {
        let events = vec![
            ev("c2", 0, 100, grab("b"), Outcome::Unknown { message: "timeout".into() }),
            ev("c1", 10, 20, grab("a"), Outcome::Grabbed { share_index: 1 }),
            ev("c2", 150, 160, grab("b"), Outcome::Grabbed { share_index: 0 }),
        ];
        let packets = HashMap::from([("p".to_string(), packet(&[("a", 1), ("b", 0)], 2))]);
        assert!(check(&events, &packets).ok());
    }
}
