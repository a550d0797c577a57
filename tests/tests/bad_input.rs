//! Bad input gets a clear error (the right gRPC code, a message naming the field) and
//! changes nothing. Calls go through raw tonic stubs, as any gRPC client in any language.

use redpacket_proto::REASON_METADATA_KEY;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::red_packet_client::RedPacketClient;
use redpacket_tests::Cluster;
use redpacket_tests::ClusterSpec;
use tonic::Code;

fn anyone() -> Option<pb::Recipients> {
    Some(pb::Recipients { to: Some(pb::recipients::To::Anyone(true)) })
}

fn create(request_id: &str, total: u64, shares: u32) -> pb::CreatePacketRequest {
    pb::CreatePacketRequest {
        request_id: request_id.into(),
        sender: "alice".into(),
        total_cents: total,
        shares,
        kind: pb::PacketKind::Lucky as i32,
        recipients: anyone(),
        message: String::new(),
        expires_in_seconds: 0,
    }
}

/// Asserts the call failed with `code` and a message starting with `field`.
fn assert_refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>, code: Code, field: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().starts_with(field), "message {:?} must name {field}", status.message());
}

/// Every group's last log index on every node, node by node: unchanged means nothing was written.
async fn log_positions(cluster: &Cluster) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    for id in cluster.node_ids() {
        out.extend(cluster.status_of(id).await.unwrap().groups.iter().map(|g| g.last_log_index));
    }
    out
}

/// [`log_positions`] once every follower holds its leader's whole log. A create returns when
/// its leader has applied its funding's `Settle`; a follower may receive that entry a moment
/// later, and taken earlier the positions would move with no bad request to blame.
async fn replicated_log_positions(cluster: &Cluster) -> Vec<Option<u64>> {
    let nodes = cluster.node_ids().len();
    for _ in 0..200 {
        let positions = log_positions(cluster).await;
        let groups = positions.len() / nodes;
        if (0..groups).all(|g| (1..nodes).all(|n| positions[n * groups + g] == positions[g])) {
            return positions;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("followers did not catch up with their leaders in 10 s: {:?}", log_positions(cluster).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_name_the_field_and_change_nothing() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 100_000).await.unwrap();
    let addr = format!("http://{}", cluster.nodes[&1].addr);
    let mut rpc = RedPacketClient::connect(addr).await.unwrap();

    // A real packet to aim the bad grabs and opens at.
    let packet = rpc.create_packet(create("good", 300, 3)).await.unwrap().into_inner().packet.unwrap();
    let id = packet.packet_id.clone();
    let before = replicated_log_positions(&cluster).await;

    // Validation failures: refused before reaching the log.
    assert_refused(rpc.create_packet(create("r1", 2, 3)).await, Code::InvalidArgument, "total_cents");
    assert_refused(rpc.create_packet(create("r2", 100, 0)).await, Code::InvalidArgument, "shares");
    assert_refused(rpc.create_packet(create("r3", 0, 1)).await, Code::InvalidArgument, "total_cents");
    assert_refused(rpc.create_packet(create("r4", 20_001, 1)).await, Code::InvalidArgument, "total_cents");
    assert_refused(rpc.create_packet(create("r5", 1000, 101)).await, Code::InvalidArgument, "shares");
    assert_refused(rpc.create_packet(create("", 100, 1)).await, Code::InvalidArgument, "request_id");
    assert_refused(
        rpc.create_packet(pb::CreatePacketRequest { sender: String::new(), ..create("r6", 100, 1) }).await,
        Code::InvalidArgument,
        "sender",
    );
    assert_refused(
        rpc.create_packet(pb::CreatePacketRequest { kind: pb::PacketKind::Equal as i32, ..create("r7", 100, 3) }).await,
        Code::InvalidArgument,
        "total_cents",
    );
    assert_refused(
        rpc.create_packet(pb::CreatePacketRequest { kind: 0, ..create("r8", 100, 3) }).await,
        Code::InvalidArgument,
        "kind",
    );
    assert_refused(
        rpc.create_packet(pb::CreatePacketRequest { recipients: None, ..create("r9", 100, 3) }).await,
        Code::InvalidArgument,
        "recipients",
    );
    let exclusive_two = pb::CreatePacketRequest {
        recipients: Some(pb::Recipients { to: Some(pb::recipients::To::User("bob".into())) }),
        ..create("r10", 100, 2)
    };
    assert_refused(rpc.create_packet(exclusive_two).await, Code::InvalidArgument, "shares");
    let empty_group = pb::CreatePacketRequest {
        recipients: Some(pb::Recipients { to: Some(pb::recipients::To::Group(pb::GroupMembers { members: vec![] })) }),
        ..create("r11", 100, 2)
    };
    assert_refused(rpc.create_packet(empty_group).await, Code::InvalidArgument, "recipients.group.members");
    assert_refused(
        rpc.create_packet(pb::CreatePacketRequest { expires_in_seconds: 30 * 86_400, ..create("r12", 100, 1) }).await,
        Code::InvalidArgument,
        "expires_in_seconds",
    );
    let grab = |packet_id: &str, user: &str| pb::GrabRequest { packet_id: packet_id.into(), user: user.into() };
    assert_refused(rpc.grab(grab(&id, "")).await, Code::InvalidArgument, "user");
    assert_refused(rpc.grab(grab("not-an-id", "bob")).await, Code::InvalidArgument, "packet_id");
    assert_refused(rpc.grab_and_open(grab("", "bob")).await, Code::InvalidArgument, "packet_id");
    // A batch answers each item as its single call would, and refuses an oversized request whole.
    let item = |operation: pb::Operation, packet_id: &str, user: &str| pb::BatchItem {
        operation: operation as i32,
        packet_id: packet_id.into(),
        user: user.into(),
    };
    let bad_items = vec![
        item(pb::Operation::Grab, &id, ""),
        item(pb::Operation::GrabAndOpen, "not-an-id", "bob"),
        pb::BatchItem { operation: 9, ..item(pb::Operation::Open, &id, "bob") },
    ];
    let results = rpc.batch(pb::BatchRequest { items: bad_items.clone(), seq: 0 }).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 3, "one result per item");
    for (result, field) in results.iter().zip(["user", "packet_id", "items[2].operation"]) {
        assert_eq!(result.code, Code::InvalidArgument as i32, "{result:?}");
        assert!(result.message.starts_with(field), "{result:?} must name {field}");
        assert_eq!(result.reason, "INVALID_INPUT", "{result:?}");
    }
    let too_many = vec![item(pb::Operation::Grab, &id, "bob"); redpacket_proto::MAX_BATCH_ITEMS + 1];
    assert_refused(rpc.batch(pb::BatchRequest { items: too_many.clone(), seq: 0 }).await, Code::InvalidArgument, "items");
    // The same on a `BatchStream`: a request is answered as the unary call, under its `seq`,
    // and an oversized one ends the stream with the unary call's status.
    let (requests, outgoing) = tokio::sync::mpsc::channel(2);
    let mut answers = rpc.batch_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await.unwrap().into_inner();
    requests.send(pb::BatchRequest { items: bad_items, seq: 7 }).await.unwrap();
    let answer = answers.message().await.unwrap().expect("an answer on the stream");
    assert_eq!((answer.seq, &answer.results), (7, &results), "the unary call's results, under the request's seq");
    requests.send(pb::BatchRequest { items: too_many, seq: 8 }).await.unwrap();
    let status = answers.message().await.expect_err("an oversized request ends the stream");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("items"), "message {:?} must name items", status.message());
    assert_refused(
        rpc.get_packet(pb::GetPacketRequest { packet_id: id.clone(), consistency: 7 }).await,
        Code::InvalidArgument,
        "consistency",
    );
    assert_eq!(log_positions(&cluster).await, before, "invalid requests must not reach any log");

    // Refusals that depend on state: decided by the state machine, changing nothing.
    let unknown = "20261123000000000000000000000000";
    assert_refused(rpc.grab(grab(unknown, "bob")).await, Code::NotFound, "packet_id");
    assert_refused(
        rpc.get_packet(pb::GetPacketRequest { packet_id: unknown.into(), consistency: 0 }).await,
        Code::NotFound,
        "packet_id",
    );
    let not_grabbed = rpc.open(pb::OpenRequest { packet_id: id.clone(), user: "bob".into() }).await.unwrap_err();
    assert_eq!(not_grabbed.code(), Code::FailedPrecondition);
    assert!(not_grabbed.message().starts_with("user"), "{not_grabbed:?}");
    assert_eq!(not_grabbed.metadata().get(REASON_METADATA_KEY).unwrap(), "NOT_GRABBED");
    let after = rpc.get_packet(pb::GetPacketRequest { packet_id: id.clone(), consistency: 0 }).await.unwrap().into_inner();
    assert_eq!(after, packet, "the packet is untouched");

    // A rejected create left nothing behind: the same request id now creates a fresh packet.
    let fresh = rpc.create_packet(create("r1", 300, 3)).await.unwrap().into_inner().packet.unwrap();
    assert_eq!((fresh.shares_grabbed, fresh.total_cents), (0, 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_retries_and_sold_out_behave_as_specified() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    cluster.deposit("alice", 100_000).await.unwrap();
    let client = cluster.client();
    use redpacket_client::Error;
    use redpacket_client::NewPacket;
    use redpacket_client::Recipients;

    // A retried create (same request id) returns the same packet, from any node.
    let mut new = NewPacket::equal("alice", 300, 3, Recipients::Group(vec!["bob".into(), "carol".into()]));
    new.request_id = "birthday-1".into();
    let first = client.create_packet(new.clone()).await.unwrap();
    let again = cluster.client_of(3).create_packet(new).await.unwrap();
    assert_eq!(first.packet_id, again.packet_id);

    // Group rules, repeated grabs and opens.
    assert!(matches!(client.grab(&first.packet_id, "mallory").await, Err(Error::NotARecipient(_))));
    let g1 = client.grab(&first.packet_id, "bob").await.unwrap();
    let g2 = cluster.client_of(2).grab(&first.packet_id, "bob").await.unwrap();
    assert_eq!(g1.share_index, g2.share_index, "a repeated grab returns the same share");
    let o1 = client.open(&first.packet_id, "bob").await.unwrap();
    let o2 = client.open(&first.packet_id, "bob").await.unwrap();
    assert_eq!(o1, o2);
    assert_eq!(o1.amount_cents, 100, "equal shares");
    client.grab_and_open(&first.packet_id, "carol").await.unwrap();
    let p = client.get_packet(&first.packet_id).await.unwrap();
    assert_eq!((p.shares_grabbed, p.shares_opened, p.remaining_cents), (2, 2, 100));

    // An exclusive packet: only its recipient may grab, and it has one share.
    let solo = client.create_packet(NewPacket::lucky("alice", 888, 1, Recipients::User("bob".into()))).await.unwrap();
    assert!(matches!(client.grab(&solo.packet_id, "carol").await, Err(Error::NotARecipient(_))));
    assert_eq!(client.grab_and_open(&solo.packet_id, "bob").await.unwrap().amount_cents, 888);

    // Sold out is sold out, for everyone but the holders.
    let small = client.create_packet(NewPacket::lucky("alice", 2, 2, Recipients::Anyone)).await.unwrap();
    client.grab(&small.packet_id, "u1").await.unwrap();
    client.grab(&small.packet_id, "u2").await.unwrap();
    assert!(matches!(client.grab(&small.packet_id, "u3").await, Err(Error::SoldOut(_))));
    assert_eq!(client.grab(&small.packet_id, "u2").await.unwrap().share_index, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_a_member_list_that_misnames_a_node() {
    let cluster = Cluster::start(ClusterSpec::default()).await.unwrap();
    let client = cluster.client_of(1);
    // Node 2's address claimed for node 7.
    let members = vec![(1, cluster.nodes[&1].addr.clone()), (7, cluster.nodes[&2].addr.clone())];
    let err = client.init_cluster(&members).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("members"), "{err}");
    // A repeated init with the right members is harmless.
    let members: Vec<(u64, String)> = cluster.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
    assert_eq!(client.init_cluster(&members).await.unwrap(), 4);
}
