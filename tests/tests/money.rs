//! Exact money on real processes: every cent moves exactly once through the payment ledger,
//! whatever crashes (failpoints between the two phases, after the commit, in the middle of an
//! apply), ledger outages and lost replies happen. Each test ends with a clean `reconcile`.

use std::time::Duration;

use redpacket_client::Error;
use redpacket_client::NewPacket;
use redpacket_client::PacketStage;
use redpacket_client::ReadConsistency;
use redpacket_client::Recipients;
use redpacket_proto::payment::Faults;
use redpacket_tests::Cluster;
use redpacket_tests::ClusterSpec;

async fn assert_clean(cluster: &Cluster) -> redpacket_client::ReconcileReport {
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty(), "reconcile found mismatches: {report:#?}");
    assert_eq!(report.pending_transfers, 0, "everything settles: {report:#?}");
    assert!(report.ledger_conserved);
    assert_eq!(report.escrow_balance_cents, report.in_escrow_cents);
    report
}

async fn available(cluster: &Cluster, account: &str) -> u64 {
    cluster.ledger().balance(account).await.unwrap().available_cents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_that_expires_half_grabbed_refunds_exactly_the_rest() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 1_000).await.unwrap();
    let client = cluster.client();
    let mut new = NewPacket::lucky("alice", 1_000, 4, Recipients::Anyone);
    new.expires_in = Some(Duration::from_secs(2));
    let p = client.create_packet(new).await.unwrap();
    assert_eq!(p.stage, PacketStage::Open as i32);
    assert_eq!(available(&cluster, "alice").await, 0, "the total left alice's wallet for escrow");
    let bob = client.grab_and_open(&p.packet_id, "bob").await.unwrap();
    client.grab(&p.packet_id, "carol").await.unwrap(); // grabbed, never opened: refunded too

    let mut closed = None;
    for _ in 0..100 {
        let now = client.get_packet(&p.packet_id).await.unwrap();
        if now.stage == PacketStage::Closed as i32 {
            closed = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = closed.expect("the packet closes after expiry");
    assert_eq!(closed.refunded_cents, 1_000 - bob.amount_cents);
    assert!(matches!(client.grab_and_open(&p.packet_id, "dave").await, Err(Error::Expired(_))));
    assert!(matches!(client.open(&p.packet_id, "carol").await, Err(Error::Expired(_))));

    let report = assert_clean(&cluster).await;
    assert_eq!((report.funded_cents, report.paid_cents, report.refunded_cents), (1_000, bob.amount_cents, 1_000 - bob.amount_cents));
    assert_eq!(available(&cluster, "alice").await, 1_000 - bob.amount_cents);
    assert_eq!(available(&cluster, "bob").await, bob.amount_cents);
    assert_eq!(available(&cluster, "carol").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_funds_fail_the_create_and_hold_nothing() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 100).await.unwrap();
    let client = cluster.client();
    let mut new = NewPacket::lucky("alice", 500, 2, Recipients::Anyone);
    new.request_id = "too-much".into();
    let err = client.create_packet(new.clone()).await.unwrap_err();
    assert!(matches!(err, Error::NotFunded(_)), "{err}");
    assert!(err.to_string().contains("sender"), "the message names the field: {err}");
    // A retry says the same, and nothing is held.
    assert!(matches!(client.create_packet(new).await, Err(Error::NotFunded(_))));
    let alice = cluster.ledger().balance("alice").await.unwrap();
    assert_eq!((alice.available_cents, alice.held_cents), (100, 0));
    // An unknown sender account is refused the same way.
    let err = client.create_packet(NewPacket::lucky("stranger", 100, 1, Recipients::Anyone)).await.unwrap_err();
    assert!(matches!(err, Error::NotFunded(_)), "{err}");
    let report = assert_clean(&cluster).await;
    assert_eq!(report.funded_cents, 0);
}

/// Creates a packet whose funding crashes the group leader at `failpoint`, then checks the
/// money moved exactly once after failover.
async fn crash_during_funding(failpoint: &str) {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 10_000).await.unwrap();
    let request_id = format!("crash-{failpoint}");
    let group = cluster.group_of_request("alice", &request_id);
    let leader = cluster.leader_of(group).await.unwrap();
    cluster.client_of(leader).set_failpoint(failpoint, "return").await.unwrap();

    let client = cluster.client();
    let mut new = NewPacket::lucky("alice", 3_000, 3, Recipients::Anyone);
    new.request_id = request_id;
    // The leader dies during the funding; the client's retry finds the packet funded by
    // the next leader.
    let p = client.create_packet(new).await.unwrap();
    assert_eq!(p.stage, PacketStage::Open as i32);
    for _ in 0..50 {
        if cluster.status_of(leader).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.status_of(leader).await.is_err(), "the failpoint crashed node {leader}");
    cluster.kill(leader); // reap the crashed process

    // Payments too: pick the new leader and crash it between prepare and commit of a payment.
    let new_leader = cluster.leader_of(group).await.unwrap();
    cluster.client_of(new_leader).set_failpoint(failpoint, "return").await.unwrap();
    cluster.start_node(leader).unwrap();
    let bob = client.grab_and_open(&p.packet_id, "bob").await.unwrap();
    let carol = client.grab_and_open(&p.packet_id, "carol").await.unwrap();
    for _ in 0..50 {
        if cluster.status_of(new_leader).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.status_of(new_leader).await.is_err(), "the failpoint crashed node {new_leader} during a payment");
    cluster.kill(new_leader);
    cluster.start_node(new_leader).unwrap();

    let report = assert_clean(&cluster).await;
    assert_eq!((report.funded_cents, report.paid_cents), (3_000, bob.amount_cents + carol.amount_cents));
    assert_eq!(available(&cluster, "alice").await, 7_000, "funded exactly once");
    assert_eq!(available(&cluster, "bob").await, bob.amount_cents, "paid exactly once");
    assert_eq!(available(&cluster, "carol").await, carol.amount_cents, "paid exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_crash_between_prepare_and_commit_moves_money_once() {
    crash_during_funding("settle-after-prepare").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_crash_after_commit_before_settling_moves_money_once() {
    crash_during_funding("settle-after-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_an_apply_batch_loses_nothing() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 10_000).await.unwrap();
    let client = cluster.client();
    let p = client.create_packet(NewPacket::lucky("alice", 5_000, 50, Recipients::Anyone)).await.unwrap();
    let leader = cluster.leader_of(p.group).await.unwrap();
    cluster.client_of(leader).set_failpoint("apply-mid-batch", "return").await.unwrap();
    // Concurrent grabs make multi-operation entries (and multi-entry applies): the leader dies
    // applying one.
    let grabs: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            let id = p.packet_id.clone();
            tokio::spawn(async move { client.grab_and_open(&id, &format!("u{i}")).await })
        })
        .collect();
    let mut total = 0;
    for g in grabs {
        total += g.await.unwrap().unwrap().amount_cents;
    }
    assert_eq!(total, 5_000, "every share was handed out exactly once");
    assert!(cluster.status_of(leader).await.is_err(), "the failpoint crashed node {leader}");
    cluster.kill(leader);
    cluster.start_node(leader).unwrap();
    let report = assert_clean(&cluster).await;
    assert_eq!(report.paid_cents, 5_000);
    let expected = client.get_packet(&p.packet_id).await.unwrap();
    for _ in 0..100 {
        let local = cluster.client_of(leader).get_packet_with(&p.packet_id, ReadConsistency::Local).await.ok();
        if local.as_ref() == Some(&expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the crashed node did not recover the packet state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_wait_for_a_ledger_outage_and_then_settle() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 10_000).await.unwrap();
    let client = cluster.client();
    let p = client.create_packet(NewPacket::lucky("alice", 2_000, 4, Recipients::Anyone)).await.unwrap();

    cluster.kill_ledger();
    // Opens go on (payment is asynchronous); a create waits for the ledger.
    let bob = client.grab_and_open(&p.packet_id, "bob").await.unwrap();
    let create = tokio::spawn({
        let client = client.clone();
        async move { client.create_packet(NewPacket::equal("alice", 1_000, 2, Recipients::Anyone)).await }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!create.is_finished(), "a create cannot finish while the ledger is down");
    let pending = client.get_packet(&p.packet_id).await.unwrap();
    assert_eq!(pending.claims[0].payment, redpacket_client::Settlement::Pending as i32);

    cluster.start_ledger().unwrap();
    let second = create.await.unwrap().unwrap();
    assert_eq!(second.stage, PacketStage::Open as i32);
    let report = assert_clean(&cluster).await;
    assert_eq!((report.funded_cents, report.paid_cents), (3_000, bob.amount_cents));
    assert_eq!(available(&cluster, "alice").await, 7_000);
    assert_eq!(available(&cluster, "bob").await, bob.amount_cents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_failed_ledger_replies_never_move_money_twice() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 100_000).await.unwrap();
    cluster
        .ledger()
        .set_faults(Faults { fail_before_ratio: 0.2, fail_after_ratio: 0.3, delay_ratio: 0.2, delay_ms: 50 })
        .await
        .unwrap();
    let client = cluster.client();
    let mut paid = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let p = client.create_packet(NewPacket::lucky("alice", 10_000, 5, Recipients::Anyone)).await.unwrap();
        for u in 0..5 {
            let user = format!("user-{u}");
            let share = client.grab_and_open(&p.packet_id, &user).await.unwrap();
            *paid.entry(user).or_insert(0) += share.amount_cents;
        }
    }
    cluster.ledger().set_faults(Faults::default()).await.unwrap();
    let report = assert_clean(&cluster).await;
    assert_eq!((report.funded_cents, report.paid_cents), (40_000, 40_000));
    assert_eq!(available(&cluster, "alice").await, 60_000);
    for (user, cents) in paid {
        assert_eq!(available(&cluster, &user).await, cents, "{user}");
    }
}
