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
