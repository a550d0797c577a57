//! TLS between every party, and token authentication: missing or wrong credentials are
//! refused (UNAUTHENTICATED / PERMISSION_DENIED) and change nothing.

use std::time::Duration;

use redpacket_client::Client;
use redpacket_client::ConnectOptions;
use redpacket_client::NewPacket;
use redpacket_client::Recipients;
use redpacket_client::RetryPolicy;
use redpacket_node::auth::AuthSettings;
use redpacket_tests::Cluster;
use redpacket_tests::ClusterSpec;
use tonic::Code;

fn quick(client: Client) -> Client {
    client.with_retry_policy(RetryPolicy { deadline: Duration::from_secs(2), ..RetryPolicy::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_over_tls_and_refuses_plaintext() {
    let cluster = Cluster::start(ClusterSpec { tls: true, ..ClusterSpec::default() }).await.unwrap();
    cluster.deposit("alice", 1000).await.unwrap();
    let client = cluster.client();
    let p = client.create_packet(NewPacket::lucky("alice", 1000, 2, Recipients::Anyone)).await.unwrap();
    let share = client.grab_and_open(&p.packet_id, "bob").await.unwrap();
    assert!(share.amount_cents >= 1);
    // Replication, forwarding and settlement all ran over TLS: the payment settles.
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty() && report.pending_transfers == 0, "{report:#?}");

    let plaintext = quick(Client::connect([cluster.nodes[&1].addr.as_str()]).unwrap());
    let err = plaintext.get_packet(&p.packet_id).await.expect_err("a plaintext client gets nothing");
    assert!(matches!(err.code(), Code::Unavailable | Code::Internal | Code::Unknown), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_and_roles_enforced() {
    let auth = AuthSettings {
        client_tokens: vec!["client-secret".into()],
        admin_tokens: vec!["admin-secret".into()],
        peer_token: Some("peer-secret".into()),
    };
    let cluster = Cluster::start(ClusterSpec { auth, ..ClusterSpec::default() }).await.unwrap();
    cluster.deposit("alice", 1000).await.unwrap();
    let addr = cluster.nodes[&1].addr.clone();
    let with = |token: Option<&str>| {
        quick(Client::connect_with([addr.as_str()], ConnectOptions { token: token.map(String::from), ..Default::default() }).unwrap())
    };
    let admin = cluster.client_of(1);
    let p = admin.create_packet(NewPacket::lucky("alice", 1000, 3, Recipients::Anyone)).await.unwrap();
    let before = admin.get_packet(&p.packet_id).await.unwrap();

    let none = with(None);
    assert_eq!(none.grab(&p.packet_id, "bob").await.unwrap_err().code(), Code::Unauthenticated);
    let wrong = with(Some("guess"));
    assert_eq!(wrong.grab(&p.packet_id, "bob").await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(wrong.reconcile().await.unwrap_err().code(), Code::Unauthenticated);
    let client = with(Some("client-secret"));
    assert_eq!(client.reconcile().await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(client.remove_node(3, |_| {}).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(admin.get_packet(&p.packet_id).await.unwrap(), before, "refused calls changed nothing");
    assert_eq!(admin.cluster_status().await[0].1.as_ref().unwrap().groups.len(), 4, "admin may read status");

    // The client token does what clients do.
    client.grab_and_open(&p.packet_id, "bob").await.unwrap();
    let report = cluster.settled_reconcile().await.unwrap();
    assert!(report.mismatches.is_empty(), "{report:#?}");
}
