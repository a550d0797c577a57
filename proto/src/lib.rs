//! Protocol buffers of redpacket and their generated tonic/prost code.
//!
//! Three packages: [`v1`] is the public API (packets and cluster administration),
//! [`raft`] is the node-to-node Raft transport, [`payment`] is the payment ledger.

/// The public API: `redpacket.v1`.
pub mod v1 {
    tonic::include_proto!("redpacket.v1");
}

/// Node-to-node Raft transport: `redpacket.raft.v1`.
pub mod raft {
    tonic::include_proto!("redpacket.raft.v1");
}

/// The payment ledger: `redpacket.payment.v1`.
pub mod payment {
    tonic::include_proto!("redpacket.payment.v1");
}

/// Encoded file descriptors of all three packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("redpacket_descriptor");

/// Name of the trailer carrying a [`v1::Reason`] on refused packet operations.
pub const REASON_METADATA_KEY: &str = "redpacket-reason";

/// Name of the response metadata naming (by address) the group leader that served a packet
/// request, so a client can send the packet's next requests straight there, skipping the
/// forwarding hop. Only a hint: any node still serves any request.
pub const LEADER_METADATA_KEY: &str = "redpacket-leader";

/// Most items in one `RedPacket/Batch` request.
pub const MAX_BATCH_ITEMS: usize = 1024;
