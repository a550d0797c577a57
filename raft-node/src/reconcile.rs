//! Reconciliation: checking that every cent is where it should be (seed 002: "there is also
//! a reconciliation to protect it").
//!
//! Three views must agree: each packet with its own transfers (funded = paid + refunded +
//! still in escrow), each recorded transfer with the ledger's record of it, and the ledger
//! with itself (balances and holds add up to the deposits). This module only compares; the
//! admin service gathers the data (every group's state read on its leader, then the ledger).

use std::collections::BTreeMap;
use std::collections::HashMap;

use crate::ledger;
use crate::packet::Packet;
use crate::packet::Stage;
use crate::packet::transfer::Settlement;
use crate::packet::transfer::Transfer;
use crate::packet::transfer::TransferKind;

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub packet_id: String,
    pub transfer_id: String,
    pub problem: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub packets: u64,
    pub transfers: u64,
    pub pending_transfers: u64,
    pub funded: u128,
    pub paid: u128,
    pub refunded: u128,
    pub in_escrow: u128,
    pub escrow_balance: u128,
    pub ledger_conserved: bool,
    pub mismatches: Vec<Mismatch>,
}

/// What the ledger says, gathered after the packet state was read.
pub struct LedgerView {
    /// Every transfer the ledger knows with a redpacket id prefix.
    pub transfers: HashMap<String, ledger::Transfer>,
    pub audit: ledger::Audit,
    pub escrow: ledger::Account,
}

fn mismatch(report: &mut Report, packet_id: &str, transfer_id: &str, problem: String) {
    report.mismatches.push(Mismatch { packet_id: packet_id.into(), transfer_id: transfer_id.into(), problem });
}

/// Compares the packets and transfers of every group with the ledger.
///
/// The state is read before the ledger, so a transfer the state calls committed must be
/// committed in the ledger, while a pending one may be anywhere. A ledger transfer unknown to
/// the state could be one recorded after the state was read: the caller re-reads its group
/// and passes what is still missing as `orphans`.
pub fn check(packets: &[Packet], transfers: &[Transfer], ledger: &LedgerView, orphans: &[String]) -> Report {
    let mut report = Report { ledger_conserved: ledger.audit.conserved(), ..Report::default() };
    report.packets = packets.len() as u64;
    report.transfers = transfers.len() as u64;

    let mut by_packet: BTreeMap<&str, Vec<&Transfer>> = BTreeMap::new();
    for t in transfers {
        by_packet.entry(t.packet_id.as_str()).or_default().push(t);
        let committed = t.settlement == Settlement::Committed;
        match (&t.settlement, ledger.transfers.get(&t.id)) {
            (Settlement::Pending, _) => report.pending_transfers += 1,
            (Settlement::Committed, Some(l)) if l.state == ledger::TransferState::Committed => {
                if (l.from.as_str(), l.to.as_str(), l.amount) != (t.from.as_str(), t.to.as_str(), t.amount) {
                    mismatch(&mut report, t.packet_id.as_str(), &t.id, format!(
                        "recorded {} → {} {} cents, ledger has {} → {} {} cents", t.from, t.to, t.amount, l.from, l.to, l.amount));
                }
            }
            (Settlement::Aborted { .. }, Some(l)) if l.state == ledger::TransferState::Aborted => {}
            (recorded, found) => mismatch(&mut report, t.packet_id.as_str(), &t.id, format!(
                "recorded {recorded:?}, ledger has {:?}", found.map(|l| l.state))),
        }
        if committed {
            match t.kind {
                TransferKind::Fund => report.funded += u128::from(t.amount),
                TransferKind::Pay => report.paid += u128::from(t.amount),
                TransferKind::Refund => report.refunded += u128::from(t.amount),
            }
        }
    }

    for p in packets {
        let id = p.id().as_str();
        let mine = by_packet.get(id).map(Vec::as_slice).unwrap_or(&[]);
        let of_kind = |k: TransferKind| mine.iter().filter(move |t| t.kind == k);
        let fund: Vec<_> = of_kind(TransferKind::Fund).collect();
        let pay_sum: u128 = of_kind(TransferKind::Pay).map(|t| u128::from(t.amount)).sum();
        let pay_count = of_kind(TransferKind::Pay).count();
        let refund: Vec<_> = of_kind(TransferKind::Refund).collect();
        let total = p.terms.total;
        match (fund.as_slice(), p.stage) {
            ([f], Stage::Funding) if f.is_pending() => {}
            ([f], Stage::FundingFailed) if matches!(f.settlement, Settlement::Aborted { .. }) => {}
            ([f], Stage::Open | Stage::Closed) if f.settlement == Settlement::Committed && f.amount == total => {}
            ([f], Stage::Closed) if matches!(f.settlement, Settlement::Aborted { .. }) && pay_count == 0 => {}
            (found, stage) => mismatch(&mut report, id, &format!("fund:{id}"), format!(
                "packet is {stage:?} but its funding is {:?}", found.iter().map(|f| (&f.settlement, f.amount)).collect::<Vec<_>>())),
        }
        if pay_sum != u128::from(p.opened_cents) || pay_count != p.opened as usize {
            mismatch(&mut report, id, "", format!(
                "{} shares opened for {} cents, but {pay_count} payments for {pay_sum} cents", p.opened, p.opened_cents));
        }
        let refund_sum: u128 = refund.iter().map(|t| u128::from(t.amount)).sum();
        if refund_sum != u128::from(p.refunded_cents) {
            mismatch(&mut report, id, &format!("refund:{id}"), format!(
                "packet refunded {} cents, transfers say {refund_sum}", p.refunded_cents));
        }
        if p.stage == Stage::Closed && p.terms.total != p.opened_cents + p.refunded_cents
            && fund.iter().all(|f| f.settlement == Settlement::Committed)
        {
            mismatch(&mut report, id, "", format!(
                "closed packet of {total} cents paid {} and refunded {}: funded ≠ paid + refunded", p.opened_cents, p.refunded_cents));
        }
    }

    for id in orphans {
        mismatch(&mut report, id.split(':').nth(1).unwrap_or(""), id, "the ledger has a transfer no packet recorded".into());
    }

    report.in_escrow = report.funded.saturating_sub(report.paid + report.refunded);
    report.escrow_balance = u128::from(ledger.escrow.available) + u128::from(ledger.escrow.held);
    // The escrow balance can only be compared when nothing is in flight.
    if report.pending_transfers == 0 && ledger.audit.prepared == 0 && report.escrow_balance != report.in_escrow {
        let problem = format!("escrow holds {} cents but packets account for {}", report.escrow_balance, report.in_escrow);
        mismatch(&mut report, "", "", problem);
    }
    if !report.ledger_conserved {
        let a = &ledger.audit;
        mismatch(&mut report, "", "", format!(
            "ledger not conserved: available {} + held {} ≠ deposited {} (prepared {})", a.available, a.held, a.deposited, a.prepared));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Kind;
    use crate::packet::NewPacket;
    use crate::packet::PacketId;
    use crate::packet::Recipients;

    fn setup() -> (Vec<Packet>, Vec<Transfer>, LedgerView) {
        let terms = NewPacket {
            packet_id: PacketId::parse("20261123000000000000000000000001").unwrap(),
            request_id: "r".into(),
            sender: "alice".into(),
            total: 300,
            shares: 3,
            kind: Kind::Lucky,
            recipients: Recipients::Anyone,
            message: String::new(),
            created_at: 0,
            expires_at: 1000,
            seed: [1; 32],
            escrow: "escrow".into(),
        };
        let mut p = Packet::new(terms.clone());
        p.funding_settled(true);
        let claim = p.grab("bob", None, 10).unwrap().claim().clone();
        let claim = p.open("bob", Some(&claim), 10).unwrap().claim().clone();
        let mut fund = Transfer::fund(&terms);
        fund.settlement = Settlement::Committed;
        let mut pay = Transfer::pay(&terms, 0, "bob", claim.amount);
        pay.settlement = Settlement::Committed;
        let ledger_of = |t: &Transfer| ledger::Transfer {
            id: t.id.clone(),
            from: t.from.clone(),
            to: t.to.clone(),
            amount: t.amount,
            state: ledger::TransferState::Committed,
        };
        let view = LedgerView {
            transfers: [(fund.id.clone(), ledger_of(&fund)), (pay.id.clone(), ledger_of(&pay))].into_iter().collect(),
            audit: ledger::Audit { accounts: 3, available: 300, held: 0, deposited: 300, prepared: 0, transfers: 2 },
            escrow: ledger::Account { available: 300 - claim.amount, held: 0 },
        };
        (vec![p], vec![fund, pay], view)
    }

    #[test]
    fn a_consistent_picture_is_clean() {
        let (packets, transfers, view) = setup();
        let r = check(&packets, &transfers, &view, &[]);
        assert_eq!(r.mismatches, vec![]);
        assert_eq!((r.funded, r.paid, r.in_escrow, r.escrow_balance), (300, r.paid, 300 - r.paid, 300 - r.paid));
    }

    #[test]
    fn a_ledger_amount_that_differs_is_named() {
        let (packets, transfers, mut view) = setup();
        let pay_id = transfers[1].id.clone();
        view.transfers.get_mut(&pay_id).unwrap().amount += 1;
        let r = check(&packets, &transfers, &view, &[]);
        assert_eq!(r.mismatches.len(), 1, "{:?}", r.mismatches);
        assert_eq!(r.mismatches[0].transfer_id, pay_id);
    }

    #[test]
    fn a_missing_payment_an_orphan_and_an_unbalanced_ledger_are_found() {
        let (packets, mut transfers, mut view) = setup();
        transfers.pop(); // the opened share has no payment
        view.audit.available += 5; // money from nowhere
        let r = check(&packets, &transfers, &view, &["pay:20261123000000000000000000000009:0".into()]);
        let problems: Vec<&str> = r.mismatches.iter().map(|m| m.problem.as_str()).collect();
        assert!(problems.iter().any(|p| p.contains("payments")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("no packet recorded")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("not conserved")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("escrow holds")), "{problems:?}");
    }
}
