//! Operating the cluster on real processes: growing and shrinking it under load, removing the
//! busiest node, replacing a dead one, rolling restarts, stopping every node at once, and the
//! refusals that keep a cluster safe (quorum, concurrent changes, reused ids).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redpacket_client::Client;
use redpacket_client::NewPacket;
use redpacket_client::ReadConsistency;
use redpacket_client::Recipients;
use redpacket_tests::Cluster;
use redpacket_tests::ClusterSpec;
use tonic::Code;

/// What the load acknowledged: (packet id, user, amount).
type Acked = Vec<(String, String, u64)>;

/// Sends and opens packets until `stop`, counting errors the client could not retry away.
fn start_load(client: Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(Acked, Vec<String>)> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut errors = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let packet = match client.create_packet(NewPacket::lucky("alice", 500, 5, Recipients::Anyone)).await {
                Ok(p) => p,
                Err(e) => {
                    errors.push(format!("create: {e}"));
                    continue;
                }
            };
            for u in 0..5 {
                let user = format!("load-{n}-{u}");
                match client.grab_and_open(&packet.packet_id, &user).await {
                    Ok(share) => acked.push((packet.packet_id.clone(), user, share.amount_cents)),
                    Err(e) => errors.push(format!("grab {user}: {e}")),
                }
            }
        }
        (acked, errors)
    })
}

/// Every acknowledged open is stored with its amount, and the replicas of `nodes` agree.
async fn check_acked(cluster: &Cluster, nodes: &[u64], acked: &Acked) {
    let client = cluster.client_of(nodes[0]);
    let packets: BTreeSet<&str> = acked.iter().map(|(p, _, _)| p.as_str()).collect();
    for id in packets {
        let stored = client.get_packet(id).await.unwrap();
        for (_, user, amount) in acked.iter().filter(|(p, _, _)| p == id) {
            let claim = stored.claims.iter().find(|c| &c.user == user).unwrap_or_else(|| panic!("{user} lost in {id}"));
            assert_eq!(claim.amount_cents, Some(*amount));
        }
        'agree: for _ in 0..100 {
            for n in nodes {
                let local = cluster.client_of(*n).get_packet_with(id, ReadConsistency::Local).await.ok();
                let same = local.map(|l| (l.shares_grabbed, l.shares_opened, l.claims.len()))
                    == Some((stored.shares_grabbed, stored.shares_opened, stored.claims.len()));
                if !same {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'agree;
                }
            }
            break;
        }
    }
}

/// A 3-node cluster (alice funded) whose nodes wait up to 120 s for their leaderships to
/// move on SIGTERM: longer than the harness waits for an exit (60 s), so a node that sat out
/// its window fails the test.
async fn cluster_with_a_long_hand_over() -> Cluster {
    let mut spec = ClusterSpec::default();
    spec.raft.stop_hand_over_ms = 120_000;
    let cluster = Cluster::start(spec).await.unwrap();
    cluster.deposit("alice", 10_000_000).await.unwrap();
    cluster
}

/// Starts the stopped nodes `ids` again and waits until every group has a leader.
async fn start_again(cluster: &mut Cluster, ids: &[u64]) {
    for id in ids {
        cluster.start_node(*id).unwrap();
    }
    for id in ids {
        cluster.wait_serving(*id).await.unwrap();
    }
    cluster.wait_all_leaders().await.unwrap();
}

async fn voters_everywhere(cluster: &Cluster, nodes: &[u64]) -> BTreeSet<Vec<u64>> {
    let mut sets = BTreeSet::new();
    for n in nodes {
        for g in cluster.status_of(*n).await.unwrap().groups {
            sets.insert(g.voters);
        }
    }
    sets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_three_to_five_and_shrink_to_three_under_load() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 10_000_000).await.unwrap();
    let addr4 = cluster.spawn_new_node(4).unwrap();
    let addr5 = cluster.spawn_new_node(5).unwrap();
    cluster.wait_serving(4).await.unwrap();
    cluster.wait_serving(5).await.unwrap();
    let everyone = Client::connect(cluster.nodes.values().map(|n| n.addr.as_str())).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(everyone.clone(), stop.clone());
    let admin = cluster.client_of(3);
    let mut steps = 0;
    admin.add_node(4, &addr4, |_| steps += 1).await.unwrap();
    admin.add_node(5, &addr5, |_| steps += 1).await.unwrap();
    assert!(steps >= 2 * 2 * 4, "progress is reported group by group ({steps} steps)");
    assert_eq!(voters_everywhere(&cluster, &[1, 2, 3, 4, 5]).await, BTreeSet::from([vec![1, 2, 3, 4, 5]]));

    admin.remove_node(1, |_| {}).await.unwrap();
    admin.remove_node(2, |_| {}).await.unwrap();
    cluster.terminate(1).await.unwrap();
    cluster.terminate(2).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, errors) = load.await.unwrap();
    assert!(errors.is_empty(), "the client saw errors: {errors:?}");
    assert!(acked.len() >= 10, "the load ran ({} opens)", acked.len());

    assert_eq!(voters_everywhere(&cluster, &[3, 4, 5]).await, BTreeSet::from([vec![3, 4, 5]]));
    check_acked(&cluster, &[3, 4, 5], &acked).await;
    let report = cluster.client_of(3).reconcile().await.unwrap();
    assert!(report.mismatches.is_empty(), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_the_busiest_node_then_replace_a_dead_one() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 1_000_000).await.unwrap();
    let addr4 = cluster.spawn_new_node(4).unwrap();
    cluster.wait_serving(4).await.unwrap();
    // Asked of the new node, which is no member yet, the client moves on to a member.
    let admin = Client::connect([addr4.as_str(), cluster.nodes[&1].addr.as_str()]).unwrap();
    admin.add_node(4, &addr4, |_| {}).await.unwrap();
    let p = cluster.client_of(4).create_packet(NewPacket::lucky("alice", 1000, 10, Recipients::Anyone)).await.unwrap();
    cluster.client_of(4).grab_and_open(&p.packet_id, "bob").await.unwrap();

    // The node leading the most groups leaves; its leaderships move first. Leaderships may
    // still be moving to the new node (a group shows no leader mid-transfer), so the count is
    // taken from a status in which every group has one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = cluster.status_with_all_leaders(4, deadline).await.unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for g in &status.groups {
        *counts.entry(g.leader.unwrap()).or_insert(0) += 1;
    }
    let busiest = *counts.iter().max_by_key(|(_, c)| **c).unwrap().0;
    let admin = cluster.client_of(if busiest == 4 { 1 } else { 4 });
    admin.remove_node(busiest, |_| {}).await.unwrap();
    cluster.terminate(busiest).await.unwrap();
    let live: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|n| *n != busiest).collect();
    for g in cluster.status_of(live[0]).await.unwrap().groups {
        assert_ne!(g.leader, Some(busiest));
        assert_eq!(g.voters, live);
    }

    // A node dies; it is removed while down and a fresh node (new id) takes its place.
    let dead = live[2];
    cluster.kill(dead);
    let admin = cluster.client_of(live[0]);
    admin.remove_node(dead, |_| {}).await.unwrap();
    let addr5 = cluster.spawn_new_node(5).unwrap();
    cluster.wait_serving(5).await.unwrap();
    admin.add_node(5, &addr5, |_| {}).await.unwrap();
    let now: Vec<u64> = vec![live[0], live[1], 5];
    assert_eq!(voters_everywhere(&cluster, &now).await, BTreeSet::from([now.clone()]));
    cluster.client_of(5).grab_and_open(&p.packet_id, "carol").await.unwrap();
    let packet = cluster.client_of(5).get_packet(&p.packet_id).await.unwrap();
    assert_eq!(packet.shares_opened, 2, "nothing was lost on the way");
    // Read through a current member (the harness's client also lists the removed nodes).
    let report = cluster.client_of(5).reconcile().await.unwrap();
    assert!(report.mismatches.is_empty(), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_membership_changes_are_refused() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    let admin = cluster.client_of(1);

    // Another change holds the cluster-wide lock: a second change is refused.
    let mut meta = redpacket_proto::v1::cluster_admin_client::ClusterAdminClient::connect(format!("http://{}", cluster.nodes[&1].addr))
        .await
        .unwrap();
    let lock = redpacket_proto::v1::ClusterMetaRequest {
        op: Some(redpacket_proto::v1::cluster_meta_request::Op::Lock("someone-else".into())),
    };
    meta.meta(lock).await.unwrap();
    let addr4 = cluster.spawn_new_node(4).unwrap();
    cluster.wait_serving(4).await.unwrap();
    let err = admin.add_node(4, &addr4, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("in flight"), "{err}");
    let unlock = redpacket_proto::v1::ClusterMetaRequest {
        op: Some(redpacket_proto::v1::cluster_meta_request::Op::Unlock("someone-else".into())),
    };
    meta.meta(unlock).await.unwrap();

    // A node id that was used before is never accepted again.
    admin.remove_node(3, |_| {}).await.unwrap();
    cluster.terminate(3).await.unwrap();
    let err = admin.add_node(3, &addr4, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.to_string().contains("never reused"), "{err}");

    // A node that claims another id is refused.
    let err = admin.add_node(9, &addr4, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Down to two voters {1, 2}; with node 2 dead, removing it needs a quorum of {1, 2}.
    cluster.kill(2);
    let err = admin.remove_node(2, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("quorum"), "{err}");
    // Removing the only live voter would leave {2}, which is down.
    let err = admin.remove_node(1, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_with_sigterm_shows_the_client_no_error() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 10_000_000).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(cluster.client(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in cluster.node_ids() {
        cluster.terminate(id).await.unwrap();
        cluster.start_node(id).unwrap();
        cluster.wait_serving(id).await.unwrap();
        cluster.wait_all_leaders().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (acked, errors) = load.await.unwrap();
    assert!(errors.is_empty(), "the client saw errors: {errors:?}");
    assert!(acked.len() >= 10, "the load ran ({} opens)", acked.len());
    check_acked(&cluster, &cluster.node_ids(), &acked).await;
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty() && report.pending_transfers == 0, "{report:#?}");
}

/// A whole cluster shut down at once (SIGTERM to every node together, under load): no node can
/// hand its leaderships to a peer, since every peer is stopping too and refuses them. Each
/// node gives up once every peer has refused, without waiting out `raft.stop_hand_over_ms`
/// (here longer than the harness waits for an exit after SIGTERM, 60 s), and exits; started
/// again, it has lost nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_every_node_at_once_ends_each_and_loses_nothing() {
    let mut cluster = cluster_with_a_long_hand_over().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(cluster.client(), stop.clone());
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    stop.store(true, Ordering::SeqCst);
    let ids = cluster.node_ids();
    cluster.terminate_all(&ids).await.unwrap();
    start_again(&mut cluster, &ids).await;

    // Calls in flight at the stop may have failed; whatever was acknowledged must be there.
    let (acked, _) = load.await.unwrap();
    assert!(acked.len() >= 10, "the load ran ({} opens)", acked.len());
    check_acked(&cluster, &ids, &acked).await;
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty() && report.pending_transfers == 0, "{report:#?}");
}

/// A cluster stopped one node at a time (SIGTERM, each waiting for the last to exit): each
/// node hands its leaderships to the nodes still running, and the last one has nobody left.
/// A peer that has already exited can still look caught up to it (nothing new was written
/// since), and asking it fails; the node must count it out rather than ask again until
/// `raft.stop_hand_over_ms` runs out (here 120 s, longer than the harness waits for an exit,
/// 60 s). Started again, the cluster has lost nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_nodes_one_by_one_ends_each_and_loses_nothing() {
    let mut cluster = cluster_with_a_long_hand_over().await;
    let client = cluster.client();
    let packet = client.create_packet(NewPacket::lucky("alice", 500, 5, Recipients::Anyone)).await.unwrap();
    let share = client.grab_and_open(&packet.packet_id, "before-the-stop").await.unwrap();

    for id in [2, 3, 1] {
        cluster.terminate(id).await.unwrap_or_else(|e| panic!("node {id}: {e}"));
    }
    let ids = cluster.node_ids();
    start_again(&mut cluster, &ids).await;
    let acked = vec![(packet.packet_id.clone(), "before-the-stop".to_string(), share.amount_cents)];
    check_acked(&cluster, &ids, &acked).await;
}
