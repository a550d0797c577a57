//! Carrying out the money movements the log recorded.
//!
//! Every transfer (funding, payment, refund) is first recorded in a group's state machine
//! as pending. The group leader then carries it out against the payment ledger, prepare then
//! commit, and proposes a `Settle` entry with the ledger's final word. A new leader (after a
//! failover or restart) finds every transfer still recorded as unsettled and does the same:
//! the ledger is idempotent by transfer id, so a transfer interrupted anywhere is completed
//! exactly once, never executed twice, never forgotten.
//!
//! Only funding can fail (insufficient funds, unknown account): the leader then aborts the
//! transfer, and the outcome recorded is whatever the ledger says it finally is, so two
//! leaders racing on one transfer always record the same outcome. Payments and refunds come
//! out of escrow, which the funding filled; they are retried until they commit.
//!
//! A pass takes up to [`BATCH`] pending transfers of every group the node leads and carries
//! them all out with two ledger calls, `PrepareBatch` then `CommitBatch` (per
//! [`LEDGER_BATCH`] transfers); each item of a batch is exactly the single call, with its own
//! outcome, so batching changes the number of round trips, not the semantics. Each group
//! then records its own outcomes in one `Settle` entry.
//!
//! Payments wait out a race. While a group keeps recording payments (a hot packet being
//! emptied, a burst of many), its payments are held back, but only for the first
//! `payment.max_payment_deferral_ms` of the race (2 s by default) and never beyond
//! [`BACKLOG`]: a longer race, or steady traffic, has its payments settled as they come, as
//! if nothing were held. Fundings and refunds are never held back. Settling costs a ledger
//! round trip, a log entry and an apply on every replica, and during a race that work
//! competes with the grabs for the same cores. The grabber already saw the amount; the
//! balance is credited a moment later, as WeChat credits accounts asynchronously (seed 002).
//! Measured on `many` (3 groups, 2 cores, 5 alternating pairs): +9 to +42 % grabs/s, and
//! the refusals straight after the race 0.9–1.7 ms at p99 instead of 1.7–2.2; every payment
//! had reached the ledger about 4 s after the race.
//!
//! The same loop closes expired packets: it proposes `Expire` with the leader's clock, and
//! the state machine records the refund.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use redpacket_proto::payment as pb;
use redpacket_proto::payment::payment_ledger_client::PaymentLedgerClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::metrics::Metrics;
use crate::packet::transfer::Settlement;
use crate::packet::transfer::Transfer;
use crate::packet::transfer::TransferKind;
use crate::raft::Command;
use crate::raft::Raft;
use crate::raft::SettledTransfer;
use crate::raft::groups::Groups;
use crate::service::packets::now_millis;
use crate::storage::Store;

/// Transfers carried out at once per group and round.
const BATCH: usize = 256;
/// Most transfers in one ledger call (a pass over many groups is split into calls of this
/// size, well under gRPC's 4 MiB message limit).
const LEDGER_BATCH: usize = 1024;
/// Deadline of one ledger call.
const LEDGER_TIMEOUT: Duration = Duration::from_secs(5);

pub fn ledger_client(endpoint: &str) -> anyhow::Result<PaymentLedgerClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(PaymentLedgerClient::new(channel))
}

/// Shortest time between two settlement passes. A pass scans each group's pending index and
/// costs two ledger calls, and a log entry per group with work; waiting a little lets a pass
/// carry many transfers instead of one.
const MIN_PASS_GAP: Duration = Duration::from_millis(20);

/// Longest time between two settlement passes. Payments and refunds do not wake the settler:
/// nobody waits on them (the user saw the amount when opening), so they go in the next
/// timed pass, many at once: fewer ledger calls, and fewer `Settle` entries, each of which
/// costs a replication round and an apply on every replica. Measured on `many`: waking for
/// every payment made about as many `Settle` entries as there were grab batches.
const PASS_INTERVAL: Duration = Duration::from_millis(100);

/// Pending transfers of one group above which settlement stops waiting for the timer. At
/// [`BATCH`] per [`PASS_INTERVAL`] a pass drains about 2,000 transfers a second per group,
/// less than one group's grabs can record. Below this mark the payments of a burst (a hot
/// packet sold out in half a second) settle over the next seconds, after the race, as
/// WeChat credits balances asynchronously; above it passes follow each other, so under a
/// sustained peak the backlog, and how late a payment arrives, stay bounded.
const BACKLOG: usize = 64 * BATCH;

/// A group that recorded a payment this recently is racing: its payments wait.
const PAYMENT_QUIET: Duration = Duration::from_millis(250);

/// Which groups are racing, and since when.
#[derive(Debug)]
struct Deferral {
    /// How long into a race a group's payments are held back. Beyond it they settle as they
    /// come until the race ends: held longer, a race that goes on would pile them up (256
    /// settled per pass could not keep up with new ones). Zero: they are never held back.
    max: Duration,
    racing_since: HashMap<u32, Instant>,
}

impl Deferral {
    fn new(max: Duration) -> Self {
        Deferral { max, racing_since: HashMap::new() }
    }

    /// Whether this pass leaves `group`'s payments for later: yes while the group recorded
    /// a payment within [`PAYMENT_QUIET`] and has been doing so for less than `max`, unless
    /// it has more than [`BACKLOG`] pending. A pause of [`PAYMENT_QUIET`] ends the race.
    fn defer(&mut self, group: u32, last_payment: Option<Instant>, unsettled: usize, now: Instant) -> bool {
        let racing = last_payment.is_some_and(|at| now.saturating_duration_since(at) < PAYMENT_QUIET);
        if !racing {
            self.racing_since.remove(&group);
            return false;
        }
        let since = *self.racing_since.entry(group).or_insert(now);
        unsettled <= BACKLOG && now.saturating_duration_since(since) < self.max
    }
}

/// Runs until aborted: settles and expires on every group this node leads. Settlement runs
/// when an apply recorded a funding transfer (a create waits for it; at most every
/// [`MIN_PASS_GAP`]), at least every [`PASS_INTERVAL`] (or `interval`, when shorter), and
/// again after [`MIN_PASS_GAP`] while a group has more than [`BACKLOG`] pending and the
/// last pass settled something; expiry every `interval`.
pub async fn run(
    groups: Arc<Groups>,
    store: Store,
    ledger: PaymentLedgerClient<Channel>,
    metrics: Arc<Metrics>,
    interval: Duration,
    max_payment_deferral: Duration,
) {
    let mut last_expiry = tokio::time::Instant::now();
    let mut backlog = false;
    let mut deferral = Deferral::new(max_payment_deferral);
    loop {
        if !backlog {
            tokio::select! {
                _ = store.settle_wake().notified() => {}
                _ = tokio::time::sleep(interval.min(PASS_INTERVAL)) => {}
            }
        }
        let expire = last_expiry.elapsed() >= interval;
        if expire {
            last_expiry = tokio::time::Instant::now();
        }
        let led: Vec<(u32, &Raft)> = groups.all().filter(|(_, raft)| raft.is_leader()).collect();
        backlog = match settle_groups(&led, &store, ledger.clone(), &mut deferral, &metrics).await {
            Ok(backlog) => backlog,
            Err(e) => {
                tracing::warn!("settlement pass: {e}");
                false
            }
        };
        if expire {
            let rounds = led.iter().map(|&(group, raft)| {
                let store = &store;
                async move {
                    if let Err(e) = expire_group(group, raft, store).await {
                        tracing::warn!(group, "expiry round: {e}");
                    }
                }
            });
            futures::future::join_all(rounds).await;
        }
        tokio::time::sleep(MIN_PASS_GAP).await;
    }
}

/// One settlement pass over every group this node leads: the pending transfers of all of
/// them go to the ledger together (one `PrepareBatch` and one `CommitBatch` per
/// [`LEDGER_BATCH`] transfers, not two calls per group), then each group records its
/// outcomes in its own `Settle` entry, side by side: a create waits for its funding, so a
/// pass must not cost the sum of every group's round trips. A racing group's payments are
/// left for later ([`Deferral`]). `true` when a group had more than [`BACKLOG`] pending and
/// this pass settled something.
async fn settle_groups(
    led: &[(u32, &Raft)],
    store: &Store,
    ledger: PaymentLedgerClient<Channel>,
    deferral: &mut Deferral,
    metrics: &Metrics,
) -> anyhow::Result<bool> {
    // Each transfer with the index in `led` of the group it belongs to.
    let mut pending: Vec<(usize, Transfer)> = Vec::new();
    let mut backlog = false;
    let now = Instant::now();
    for (slot, &(group, _)) in led.iter().enumerate() {
        let reader = store.reader(group);
        let unsettled = reader.unsettled_count();
        backlog |= unsettled > BACKLOG;
        let transfers = if deferral.defer(group, reader.last_payment_recorded(), unsettled, now) {
            metrics.payments_held_back(group);
            reader.unsettled_except_payments(BATCH)?
        } else {
            reader.unsettled(BATCH)?
        };
        pending.extend(transfers.into_iter().map(|t| (slot, t)));
    }
    if pending.is_empty() {
        return Ok(false);
    }
    let mut outcomes = Vec::with_capacity(pending.len());
    for chunk in pending.chunks(LEDGER_BATCH) {
        let transfers: Vec<&Transfer> = chunk.iter().map(|(_, t)| t).collect();
        outcomes.extend(execute_all(ledger.clone(), &transfers).await);
    }
    // Crash after the ledger moved the money but before the log knows: the next leader
    // must find the transfer pending, re-run it (a no-op at the ledger) and settle it.
    fail::fail_point!("settle-after-commit", |_| std::process::abort());
    let mut settled: Vec<Vec<SettledTransfer>> = vec![Vec::new(); led.len()];
    for ((slot, t), outcome) in pending.into_iter().zip(outcomes) {
        if let Some(outcome) = outcome {
            settled[slot].push(SettledTransfer { transfer_id: t.id, outcome });
        }
    }
    // Hurry back only if this pass got somewhere: with the ledger down, wait for the timer.
    let backlog = backlog && settled.iter().any(|s| !s.is_empty());
    let rounds = led.iter().zip(settled).filter(|(_, s)| !s.is_empty()).map(|(&(group, raft), settled)| async move {
        tracing::debug!(group, count = settled.len(), "settling transfers");
        if let Err(e) = raft.client_write(Command::Settle(settled)).await {
            tracing::warn!(group, "settle entry not committed: {e}");
        }
    });
    futures::future::join_all(rounds).await;
    Ok(backlog)
}

async fn expire_group(group: u32, raft: &Raft, store: &Store) -> anyhow::Result<()> {
    let now = now_millis();
    let expired = store.reader(group).expired(now, BATCH)?;
    if expired.is_empty() {
        return Ok(());
    }
    tracing::info!(group, count = expired.len(), "closing expired packets");
    raft.client_write(Command::Expire { packet_ids: expired, at: now }).await?;
    Ok(())
}

fn request<T>(body: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.set_timeout(LEDGER_TIMEOUT);
    req
}

/// A refusal that retrying cannot change.
fn is_definitive(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists | Code::InvalidArgument | Code::OutOfRange)
}

/// Carries out `transfers`: one `PrepareBatch`, then one `CommitBatch` for the prepared.
/// Each outcome is `None` when not decided yet (the ledger is unreachable or slow): that
/// transfer stays pending and the next round tries again.
async fn execute_all(mut ledger: PaymentLedgerClient<Channel>, transfers: &[&Transfer]) -> Vec<Option<Settlement>> {
    let mut outcomes: Vec<Option<Settlement>> = vec![None; transfers.len()];
    let prepare = pb::PrepareBatchRequest {
        transfers: transfers
            .iter()
            .map(|t| pb::PrepareRequest { transfer_id: t.id.clone(), from_account: t.from.clone(), to_account: t.to.clone(), amount_cents: t.amount })
            .collect(),
    };
    let prepared = match ledger.prepare_batch(request(prepare)).await {
        Ok(r) => r.into_inner().outcomes,
        Err(status) => {
            tracing::debug!(count = transfers.len(), "prepare batch not answered: {status}");
            return outcomes;
        }
    };
    let mut to_commit = Vec::new();
    for (i, (t, item)) in transfers.iter().zip(&prepared).enumerate() {
        let status = item_status(item);
        match status {
            None => to_commit.push(i),
            Some(status) if is_definitive(&status) && t.kind == TransferKind::Fund => {
                outcomes[i] = abort(&mut ledger, t, status.message()).await;
            }
            Some(status) if is_definitive(&status) => {
                tracing::error!(transfer = %t.id, packet_id = %t.packet_id, "ledger refused a {:?}: {status}; will retry", t.kind);
            }
            Some(status) => tracing::debug!(transfer = %t.id, "prepare not done: {status}"),
        }
    }
    if to_commit.is_empty() {
        return outcomes;
    }
    // Crash between the two phases: the holds stay until a leader commits them.
    fail::fail_point!("settle-after-prepare", |_| std::process::abort());
    let commit = pb::CommitBatchRequest { transfer_ids: to_commit.iter().map(|&i| transfers[i].id.clone()).collect() };
    let committed = match ledger.commit_batch(request(commit)).await {
        Ok(r) => r.into_inner().outcomes,
        Err(status) => {
            tracing::debug!(count = to_commit.len(), "commit batch not answered: {status}");
            return outcomes;
        }
    };
    for (&i, item) in to_commit.iter().zip(&committed) {
        outcomes[i] = match item_status(item) {
            None => Some(Settlement::Committed),
            // Another leader aborted it first; the ledger's word stands.
            Some(status) if status.code() == Code::FailedPrecondition => Some(Settlement::Aborted { reason: status.message().to_string() }),
            Some(status) => {
                tracing::debug!(transfer = %transfers[i].id, "commit not done: {status}");
                None
            }
        };
    }
    outcomes
}

/// The status of one item of a batch answer (`None`: it succeeded).
fn item_status(item: &pb::BatchOutcome) -> Option<tonic::Status> {
    (item.code != Code::Ok as i32).then(|| tonic::Status::new(Code::from_i32(item.code), item.message.clone()))
}

/// Abandons a funding transfer the ledger refused; records whatever the ledger finally says.
async fn abort(ledger: &mut PaymentLedgerClient<Channel>, t: &Transfer, reason: &str) -> Option<Settlement> {
    match ledger.abort(request(pb::TransferIdRequest { transfer_id: t.id.clone() })).await {
        Ok(_) => Some(Settlement::Aborted { reason: reason.to_string() }),
        // Committed by another leader after all.
        Err(status) if status.code() == Code::FailedPrecondition => Some(Settlement::Committed),
        Err(status) => {
            tracing::debug!(transfer = %t.id, "abort not answered: {status}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_secs(2);

    #[test]
    fn payments_wait_while_the_group_records_them_and_no_longer() {
        let mut deferral = Deferral::new(MAX);
        let t0 = Instant::now();
        assert!(!deferral.defer(1, None, 10, t0), "no payment recorded: nothing to wait for");
        assert!(deferral.defer(1, Some(t0), 10, t0 + 100 * MS), "a payment 100 ms ago: racing");
        assert!(!deferral.defer(2, Some(t0 - 300 * MS), 10, t0 + 100 * MS), "groups are apart");
        assert!(!deferral.defer(1, Some(t0), 10, t0 + PAYMENT_QUIET), "quiet for PAYMENT_QUIET: the race is over");
        assert!(deferral.defer(1, Some(t0), BACKLOG, t0 + 10 * MS));
        assert!(!deferral.defer(1, Some(t0), BACKLOG + 1, t0 + 10 * MS), "a backlog is settled however busy the group is");
    }

    #[test]
    fn a_race_longer_than_the_maximum_has_its_payments_settled_as_they_come_until_it_ends() {
        let mut deferral = Deferral::new(MAX);
        let t0 = Instant::now();
        let mut held = Vec::new();
        // A pass every 100 ms for 5 s, a payment recorded just before each...
        for pass in 0..50u32 {
            let now = t0 + pass * 100 * MS;
            if deferral.defer(1, Some(now - MS), 100, now) {
                held.push(pass);
            }
        }
        assert_eq!(held, (0..20).collect::<Vec<_>>(), "held for the first 2 s only");
        // ...then a pause of PAYMENT_QUIET ends the race, and the next one is held again.
        let later = t0 + 5 * MAX;
        assert!(!deferral.defer(1, Some(later - PAYMENT_QUIET), 100, later));
        assert!(deferral.defer(1, Some(later + MS), 100, later + 2 * MS));
    }

    #[test]
    fn a_zero_maximum_never_holds_payments_back() {
        let mut deferral = Deferral::new(Duration::ZERO);
        let t0 = Instant::now();
        assert!(!deferral.defer(1, Some(t0), 10, t0 + MS));
        assert!(!deferral.defer(1, Some(t0 + 100 * MS), 10, t0 + 101 * MS));
    }
}
