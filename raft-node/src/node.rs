//! Runs one node: opens its storage, starts its Raft groups, and serves every gRPC service
//! on one port until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redpacket_proto::FILE_DESCRIPTOR_SET;
use redpacket_proto::raft::raft_transport_server::RaftTransportServer;
use redpacket_proto::v1::cluster_admin_server::ClusterAdminServer;
use redpacket_proto::v1::red_packet_server::RedPacketServer;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::config::NodeConfig;
use crate::raft::balance;
use crate::raft::groups::Groups;
use crate::raft::network::MAX_RAFT_MESSAGE;
use crate::raft::network::PeerChannels;
use crate::service::NodeContext;
use crate::service::admin::AdminService;
use crate::service::packets::PacketService;
use crate::service::transport::TransportService;
use crate::storage::Store;

/// Largest request a client may send (a create with a long member list fits easily).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// Runs the node until `shutdown` completes, then stops serving and shuts its groups down.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let node_id = config.node_id;
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir, node_id, config.groups)?;
    let peers = Arc::new(PeerChannels::default());
    // Bind first, so a port conflict is reported before any Raft starts.
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("listening on {}", config.listen_addr))?;
    let groups = Arc::new(Groups::start(&config, &store, peers.clone()).await?);
    let ctx = Arc::new(NodeContext {
        node_id,
        addr: config.advertise_addr(),
        groups: groups.clone(),
        store,
        peers,
        limits: config.limits.clone(),
        payment: config.payment.clone(),
        ledger: crate::settlement::ledger_client(&config.payment.endpoint)?,
    });

    let balancer = config
        .raft
        .balance_leaders
        .then(|| tokio::spawn(balance::run(groups.clone(), Duration::from_millis(config.raft.balance_interval_ms))));

    let settler = tokio::spawn(crate::settlement::run(
        groups.clone(),
        ctx.store.clone(),
        ctx.ledger.clone(),
        Duration::from_millis(config.payment.settle_interval_ms),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RedPacketServer<PacketService>>().await;
    // Reflection lists exactly the services this port serves (the payment ledger's
    // descriptor is in the same set but is served by its own process).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("redpacket.v1.RedPacket")
        .with_service_name("redpacket.v1.ClusterAdmin")
        .with_service_name("redpacket.raft.v1.RaftTransport")
        .with_service_name("grpc.health.v1.Health")
        .build_v1()?;

    tracing::info!(node_id, addr = %config.listen_addr, data_dir = %config.data_dir.display(), groups = config.groups, "node serving");
    Server::builder()
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RedPacketServer::new(PacketService::new(ctx.clone())).max_decoding_message_size(MAX_CLIENT_MESSAGE))
        .add_service(ClusterAdminServer::new(AdminService::new(ctx.clone())).max_decoding_message_size(MAX_CLIENT_MESSAGE))
        .add_service(
            RaftTransportServer::new(TransportService::new(ctx.clone()))
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;

    tracing::info!(node_id, "stopping");
    if let Some(b) = balancer {
        b.abort();
    }
    settler.abort();
    groups.shutdown().await;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
