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
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use tonic::service::interceptor::InterceptedService;

use crate::auth::Authenticator;
use crate::auth::Role;
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
    let client_tls = config.tls.as_ref().map(|t| t.client_config()).transpose()?;
    let peers = Arc::new(PeerChannels::new(config.auth.peer_token.as_deref(), client_tls));
    // Bind first, so a port conflict is reported before any Raft starts (the metrics port
    // too: a node whose metrics nobody can read must not run).
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("listening on {}", config.listen_addr))?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics_addr {addr}: cannot listen"))?),
        None => None,
    };
    let groups = Arc::new(Groups::start(&config, &store, peers.clone()).await?);
    let metrics = crate::metrics::Metrics::new(node_id);
    let ctx = Arc::new(NodeContext {
        node_id,
        addr: config.advertise_addr(),
        groups: groups.clone(),
        store,
        peers,
        limits: config.limits.clone(),
        payment: config.payment.clone(),
        ledger: crate::settlement::ledger_client(&config.payment.endpoint)?,
        stopping: Default::default(),
        draining: tokio::sync::watch::Sender::new(false),
        batchers: crate::service::batcher::Batchers::start(&groups, metrics.clone()),
        metrics,
    });
    let sampler = tokio::spawn(crate::metrics::sample_forever(ctx.metrics.clone(), groups.clone(), ctx.store.clone()));
    let metrics_server = metrics_listener.map(|listener| tokio::spawn(crate::metrics::serve(ctx.metrics.clone(), listener)));

    let balancer = config
        .raft
        .balance_leaders
        .then(|| tokio::spawn(balance::run(groups.clone(), ctx.store.clone(), Duration::from_millis(config.raft.balance_interval_ms))));

    let settler = tokio::spawn(crate::settlement::run(
        groups.clone(),
        ctx.store.clone(),
        ctx.ledger.clone(),
        ctx.metrics.clone(),
        Duration::from_millis(config.payment.settle_interval_ms),
        Duration::from_millis(config.payment.max_payment_deferral_ms),
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
    let mut server = Server::builder();
    if let Some(tls) = &config.tls {
        server = server.tls_config(tls.server_config()?)?;
    }
    let auth = |role| Authenticator::new(&config.auth, role);
    server
        .timeout(Duration::from_secs(30))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InterceptedService::new(
            RedPacketServer::new(PacketService::new(ctx.clone())).max_decoding_message_size(MAX_CLIENT_MESSAGE),
            auth(Role::Client),
        ))
        .add_service(InterceptedService::new(
            ClusterAdminServer::new(AdminService::new(ctx.clone()))
                .max_decoding_message_size(MAX_CLIENT_MESSAGE)
                .max_encoding_message_size(256 << 20),
            auth(Role::Admin),
        ))
        .add_service(InterceptedService::new(
            RaftTransportServer::new(TransportService::new(ctx.clone()))
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
            auth(Role::Peer),
        ))
        // The builder's `tcp_nodelay` covers only sockets it binds itself; ours needs it set
        // here, or small responses wait ~40 ms for delayed ACKs (Nagle).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), {
            let ctx = ctx.clone();
            let balancer = balancer.as_ref().map(|b| b.abort_handle());
            let hand_over = config.raft.stop_hand_over_ms;
            async move {
                shutdown.await;
                // Graceful stop: take no new leaderships, hand ours over while still serving
                // (requests arriving meanwhile are forwarded to the new leaders).
                ctx.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Some(b) = balancer {
                    b.abort();
                }
                if hand_over > 0 {
                    tracing::info!(node_id, "stopping: handing leaderships over");
                    hand_over_leaderships(&ctx.groups, &ctx.peers, Duration::from_millis(hand_over)).await;
                }
                ctx.draining.send_replace(true);
            }
        })
        .await?;

    tracing::info!(node_id, "stopping");
    if let Some(b) = balancer {
        b.abort();
    }
    settler.abort();
    sampler.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    groups.shutdown().await;
    Ok(())
}

/// Transfers every leadership this node holds to another caught-up voter (the group's
/// preferred one when it can), and waits until they moved or `wait` passed. A voter that
/// cannot take one (it refused because it is stopping too, or a call to it failed
/// UNAVAILABLE since the hand-over began) is not asked; a group whose every other voter is
/// such has nowhere to go, so a cluster stopped all at once does not sit out `wait`.
pub async fn hand_over_leaderships(groups: &Groups, peers: &PeerChannels, wait: Duration) {
    use openraft::type_config::async_runtime::WatchReceiver;
    let me = groups.node_id();
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut leading = 0;
        let unavailable = peers.unavailable_since(started);
        for (group, raft) in groups.all() {
            let m = raft.metrics().borrow_watched().clone();
            if m.state != openraft::ServerState::Leader {
                continue;
            }
            let others: Vec<u64> =
                m.membership_config.membership().voter_ids().filter(|v| *v != me && !unavailable.contains(v)).collect();
            if others.is_empty() {
                continue; // a single-voter group, or no other voter can take it: nowhere to go
            }
            leading += 1;
            let caught_up = |id: &u64| {
                m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| Some(l.index) >= m.last_log_index).unwrap_or(false)
            };
            let preferred = balance::preferred_leader(group, &others).filter(|p| caught_up(p));
            if let Some(to) = preferred.or_else(|| others.iter().copied().find(|o| caught_up(o)))
                && let Err(e) = raft.trigger().transfer_leader(to).await
            {
                tracing::warn!(group, "hand-over to node {to}: {e}");
            }
        }
        if leading == 0 || tokio::time::Instant::now() >= deadline {
            if leading > 0 {
                tracing::warn!(leading, "stopping while still leading some groups");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
