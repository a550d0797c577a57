//! Durability and catch-up on real processes: a node that was down while the leader
//! snapshotted and purged its log catches up by snapshot; a whole-cluster restart keeps
//! every acknowledged write; expiry is enforced with the leader's clock.

use std::time::Duration;

use redpacket_client::Error;
use redpacket_client::NewPacket;
use redpacket_client::ReadConsistency;
use redpacket_client::Recipients;
use redpacket_tests::Cluster;
use redpacket_tests::ClusterSpec;

/// The packet without its settlement states, which move on their own after an operation.
fn terms_and_claims(p: &redpacket_client::Packet) -> redpacket_client::Packet {
    let mut p = p.clone();
    p.funding = 0;
    p.refund = 0;
    for c in &mut p.claims {
        c.payment = 0;
    }
    p
}

async fn wait_replicas_equal(cluster: &Cluster, packet_id: &str, expected: &redpacket_client::Packet) {
    let mut last = Vec::new();
    for _ in 0..300 {
        last.clear();
        for id in cluster.node_ids() {
            last.push(cluster.client_of(id).get_packet_with(packet_id, ReadConsistency::Local).await.ok());
        }
        if last.iter().all(|p| p.as_ref() == Some(expected)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replicas disagree after 30 s: {last:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_purged_log_catches_up_by_snapshot() {
    let mut spec = ClusterSpec::default();
    spec.raft.snapshot_every_entries = 20;
    spec.raft.keep_entries_after_snapshot = 5;
    let mut cluster = Cluster::start(spec).await.unwrap();
    cluster.deposit("alice", 1_000_000).await.unwrap();
    let client = cluster.client();
    let packet = client.create_packet(NewPacket::lucky("alice", 10_000, 100, Recipients::Anyone)).await.unwrap();
    let group = packet.group;
    let lagging = 3;
    let behind = cluster.status_of(lagging).await.unwrap().groups[group as usize].last_log_index.unwrap();
    cluster.kill(lagging);

    for i in 0..80 {
        client.grab_and_open(&packet.packet_id, &format!("user-{i}")).await.unwrap();
    }
    let leader = cluster.leader_of(group).await.unwrap();
    let purged = cluster.status_of(leader).await.unwrap().groups[group as usize].purged_index;
    assert!(purged > Some(behind), "the leader purged past what node {lagging} has (purged {purged:?}, node had {behind})");

    cluster.start_node(lagging).unwrap();
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty() && report.pending_transfers == 0, "{report:#?}");
    let expected = client.get_packet(&packet.packet_id).await.unwrap();
    assert_eq!(expected.shares_opened, 80);
    wait_replicas_equal(&cluster, &packet.packet_id, &expected).await;
    let status = cluster.status_of(lagging).await.unwrap();
    assert!(status.groups[group as usize].snapshot_index.is_some(), "node {lagging} installed a snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_restart_keeps_every_acknowledged_write() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 1_000_000).await.unwrap();
    let client = cluster.client();
    let mut packets = Vec::new();
    for i in 0..8 {
        let p = client.create_packet(NewPacket::lucky("alice", 1000, 5, Recipients::Anyone)).await.unwrap();
        for u in 0..=i % 5 {
            client.grab_and_open(&p.packet_id, &format!("u{u}")).await.unwrap();
        }
        packets.push(client.get_packet(&p.packet_id).await.unwrap());
    }
    // Everybody dies at once, as in a power cut.
    for id in cluster.node_ids() {
        cluster.kill(id);
    }
    for id in cluster.node_ids() {
        cluster.start_node(id).unwrap();
    }
    cluster.wait_all_leaders().await.unwrap();
    // Payments still pending at the crash are completed by the new leaders.
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty() && report.pending_transfers == 0, "{report:#?}");
    for p in &packets {
        let now = client.get_packet(&p.packet_id).await.unwrap();
        assert_eq!(terms_and_claims(&now), terms_and_claims(p), "packet {} survived", p.packet_id);
        wait_replicas_equal(&cluster, &p.packet_id, &now).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_packet_refuses_grabs_and_opens() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 1_000_000).await.unwrap();
    let client = cluster.client();
    let mut new = NewPacket::lucky("alice", 300, 3, Recipients::Anyone);
    new.expires_in = Some(Duration::from_secs(1));
    let p = client.create_packet(new).await.unwrap();
    assert_eq!(p.expires_at_ms - p.created_at_ms, 1000);
    client.grab(&p.packet_id, "bob").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(client.grab(&p.packet_id, "carol").await, Err(Error::Expired(_))));
    assert!(matches!(client.open(&p.packet_id, "bob").await, Err(Error::Expired(_))));
    // bob's grab, acknowledged before expiry, is still his.
    assert_eq!(client.grab(&p.packet_id, "bob").await.unwrap().share_index, 0);
}
