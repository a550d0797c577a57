//! What operators and load balancers rely on: gRPC health and reflection, cluster status, and
//! group leaders spread over the nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use redpacket_tests::Cluster;
use redpacket_tests::ClusterSpec;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_status_and_leader_spread() {
    let spec = ClusterSpec { groups: 6, ..ClusterSpec::default() };
    let cluster = Cluster::start(spec).await.unwrap();
    let addr = format!("http://{}", cluster.nodes[&2].addr);

    let channel = tonic::transport::Endpoint::from_shared(addr).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let resp = health.check(HealthCheckRequest { service: "redpacket.v1.RedPacket".into() }).await.unwrap();
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let Some(Ok(reply)) = stream.next().await else { panic!("no reflection reply") };
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("unexpected reply") };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["redpacket.v1.RedPacket", "redpacket.v1.ClusterAdmin", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == expected), "{expected} missing from {services:?}");
    }

    // Every node reports every group with the same leader and all three voters, and the
    // leaders settle on the preferred spread: 6 groups over 3 nodes, 2 each.
    let mut counts = BTreeMap::new();
    for _ in 0..150 {
        counts.clear();
        let mut agree = true;
        let first = cluster.status_of(1).await.unwrap();
        for id in cluster.node_ids() {
            let status = cluster.status_of(id).await.unwrap();
            assert_eq!(status.node_id, id);
            assert_eq!(status.groups.len(), 6);
            for (g, f) in status.groups.iter().zip(&first.groups) {
                assert_eq!(g.voters, vec![1, 2, 3]);
                agree &= g.leader == f.leader && g.leader.is_some();
                if g.role == "leader" {
                    *counts.entry(id).or_insert(0) += 1;
                }
            }
        }
        if agree && counts.values().all(|&c| c == 2) && counts.len() == 3 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("leaders did not spread evenly within 15 s: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_report_requests_raft_and_money() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 1000).await.unwrap();
    let client = cluster.client_of(1);
    let p = client.create_packet(redpacket_client::NewPacket::lucky("alice", 1000, 2, redpacket_client::Recipients::Anyone)).await.unwrap();
    client.grab_and_open(&p.packet_id, "bob").await.unwrap();
    let _ = client.grab("20261123000000000000000000000000", "bob").await; // NotFound
    tokio::time::sleep(Duration::from_millis(1500)).await; // one sampling round
    let text = cluster.scrape(1).await.unwrap();
    assert!(text.starts_with("HTTP/1.") && text.contains(" 200 "), "{text}");
    for expected in [
        r#"redpacket_requests_total{code="Ok",method="grab_and_open",node="1"} 1"#,
        r#"redpacket_requests_total{code="NotFound",method="grab",node="1"} 1"#,
        "redpacket_request_duration_seconds_bucket",
        "redpacket_raft_last_applied_index",
        "redpacket_raft_is_leader",
        "redpacket_unsettled_transfers",
        "redpacket_rocksdb_size_bytes",
        // The client's grabs went as messages on one stream to node 1, which it still holds.
        r#"redpacket_batch_streams_open{node="1"} 1"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
    let leads: i64 = text
        .lines()
        .filter(|l| l.starts_with("redpacket_raft_is_leader{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum();
    let status = cluster.status_of(1).await.unwrap();
    assert_eq!(leads, status.groups.iter().filter(|g| g.role == "leader").count() as i64);

    // A client that goes away closes its stream, and the node lets go of it.
    drop(client);
    let closed = r#"redpacket_batch_streams_open{node="1"} 0"#;
    for _ in 0..50 {
        if cluster.scrape(1).await.unwrap().contains(closed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the stream of a dropped client is still open after 5 s");
}

/// A node whose metrics address is taken must refuse to start, naming the setting, rather
/// than run with metrics nobody can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = redpacket_node::config::NodeConfig::local(1, redpacket_tests::free_port(), dir.path().join("node-1"));
    config.metrics_addr = Some(taken.local_addr().unwrap());
    let config_path = dir.path().join("node-1.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let run = tokio::process::Command::new(redpacket_tests::node_binary()).arg("--config").arg(&config_path).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the node exits within 60 s").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node started on a taken metrics address: {stderr}");
    assert!(stderr.contains(&format!("metrics_addr {}", taken.local_addr().unwrap())), "{stderr}");
}
