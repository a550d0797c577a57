//! Node configuration: a TOML file (see `config/local/*.toml` for every key, commented), or
//! the embedded defaults used by `redpacket-node dev`.

use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use crate::packet::Limits;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: unique in the cluster, never reused.
    pub node_id: u64,
    /// Where the gRPC server listens (clients, admin and Raft peers all use it).
    pub listen_addr: SocketAddr,
    /// The address other nodes and clients reach this node at; defaults to `listen_addr`.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Where RocksDB and snapshots live.
    pub data_dir: PathBuf,
    /// Number of Raft groups packets are hashed into. Fixed when the cluster is created.
    #[serde(default = "default_groups")]
    pub groups: u32,
    #[serde(default)]
    pub raft: RaftSettings,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub payment: PaymentSettings,
    /// Bearer tokens (none: authentication off).
    #[serde(default)]
    pub auth: crate::auth::AuthSettings,
    /// TLS for every gRPC connection to and between nodes (absent: plaintext).
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Where Prometheus scrapes `/metrics` (absent: no metrics endpoint).
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
}

/// Certificates for TLS (PEM files). Every node's certificate must be valid for
/// `server_name`, which peers and clients check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed the nodes' certificates.
    pub ca_file: PathBuf,
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

impl TlsSettings {
    fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("tls: reading {}: {e}", path.display()))
    }

    pub fn server_config(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        let identity = tonic::transport::Identity::from_pem(Self::read(&self.cert_file)?, Self::read(&self.key_file)?);
        Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
    }

    pub fn client_config(&self) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(Self::read(&self.ca_file)?))
            .domain_name(self.server_name.clone()))
    }
}

/// How the node reaches the payment ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentSettings {
    /// Address of the `redpacket-payment` ledger.
    pub endpoint: String,
    /// Ledger account holding packets' money between funding and payout or refund.
    pub escrow_account: String,
    /// How long a create waits for its funding to settle before answering UNAVAILABLE
    /// (the client's retry then finds the funded packet).
    pub fund_timeout_ms: u64,
    /// How often a leader looks for unsettled transfers and expired packets (it is also
    /// woken at once when a transfer is recorded).
    pub settle_interval_ms: u64,
    /// How long into a race (a group recording payments) its leader holds the group's
    /// payments back; later ones settle as they come. 0: payments never wait.
    pub max_payment_deferral_ms: u64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        PaymentSettings {
            endpoint: "127.0.0.1:7100".into(),
            escrow_account: "escrow:redpacket".into(),
            fund_timeout_ms: 10_000,
            settle_interval_ms: 500,
            max_payment_deferral_ms: 2_000,
        }
    }
}

/// A payment is held back during a race for at most a minute: beyond that a grabber would
/// wonder where the money went.
pub const MAX_PAYMENT_DEFERRAL_LIMIT_MS: u64 = 60_000;

fn default_groups() -> u32 {
    16
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log after a snapshot, so a briefly lagging follower catches up
    /// from the log rather than by snapshot.
    pub keep_entries_after_snapshot: u64,
    /// Move group leaderships to their preferred node (group index modulo voters), so the
    /// leaders spread over the nodes.
    pub balance_leaders: bool,
    pub balance_interval_ms: u64,
    /// On a graceful stop, how long the node may spend handing its leaderships over before it
    /// stops serving (0: stop at once, and let elections move them).
    pub stop_hand_over_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 150,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_every_entries: 5000,
            keep_entries_after_snapshot: 1000,
            balance_leaders: true,
            balance_interval_ms: 2000,
            stop_hand_over_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{path}: {field}: {reason}")]
    Invalid { path: PathBuf, field: &'static str, reason: String },
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        // A relative data directory is relative to the working directory, as with any
        // command-line tool; say so in the logs (see node.rs).
        config.validate().map_err(|(field, reason)| ConfigError::Invalid { path: path.into(), field, reason })?;
        if config.data_dir.is_relative() {
            config.data_dir = std::env::current_dir().map(|d| d.join(&config.data_dir)).unwrap_or(config.data_dir);
        }
        Ok(config)
    }

    /// The embedded defaults of node `node_id` of a local cluster.
    pub fn local(node_id: u64, port: u16, data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            node_id,
            listen_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            advertise_addr: None,
            data_dir,
            groups: default_groups(),
            raft: RaftSettings::default(),
            limits: Limits::default(),
            payment: PaymentSettings::default(),
            auth: Default::default(),
            tls: None,
            metrics_addr: None,
        }
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise_addr.clone().unwrap_or_else(|| self.listen_addr.to_string())
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.node_id == 0 {
            return Err(("node_id", "must be at least 1".into()));
        }
        if self.groups == 0 || self.groups > 4096 {
            return Err(("groups", "must be between 1 and 4096".into()));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return Err(("raft.election_timeout_min_ms", "must exceed twice raft.heartbeat_ms".into()));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(("raft.election_timeout_max_ms", "must exceed raft.election_timeout_min_ms".into()));
        }
        if self.payment.endpoint.is_empty() {
            return Err(("payment.endpoint", "must be set".into()));
        }
        if crate::packet::validate::user_id("payment.escrow_account", &self.payment.escrow_account).is_err() {
            return Err(("payment.escrow_account", "must be a non-empty printable account id".into()));
        }
        if self.payment.max_payment_deferral_ms > MAX_PAYMENT_DEFERRAL_LIMIT_MS {
            return Err(("payment.max_payment_deferral_ms", format!("must be at most {MAX_PAYMENT_DEFERRAL_LIMIT_MS} (0: payments never wait)")));
        }
        if r.snapshot_every_entries == 0 {
            return Err(("raft.snapshot_every_entries", "must be at least 1".into()));
        }
        // A packet's read lists every claim (about 45 bytes each): a million shares keeps it
        // under the client crate's 64 MiB answer limit.
        if self.limits.max_shares == 0 || self.limits.max_shares > MAX_SHARES_LIMIT {
            return Err(("limits.max_shares", format!("must be between 1 and {MAX_SHARES_LIMIT}")));
        }
        Ok(())
    }

    /// openraft's configuration for every group of this node.
    pub fn openraft_config(&self) -> Result<openraft::Config, openraft::ConfigError> {
        let r = &self.raft;
        openraft::Config {
            cluster_name: "redpacket".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
            max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
            ..Default::default()
        }
        .validate()
    }
}

/// Highest `limits.max_shares` a node accepts.
pub const MAX_SHARES_LIMIT: u32 = 1_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configs_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/local");
        for n in 1..=3 {
            let c = NodeConfig::load(&dir.join(format!("node-{n}.toml"))).unwrap();
            assert_eq!(c.node_id, n);
            c.openraft_config().unwrap();
        }
    }

    #[test]
    fn max_shares_is_bounded_so_a_packet_read_fits_in_an_answer() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/local");
        let mut c = NodeConfig::load(&dir.join("node-1.toml")).unwrap();
        c.limits.max_shares = 100_000;
        assert!(c.validate().is_ok());
        for bad in [0, MAX_SHARES_LIMIT + 1] {
            c.limits.max_shares = bad;
            assert_eq!(c.validate().unwrap_err().0, "limits.max_shares");
        }
    }

    #[test]
    fn payment_deferral_is_bounded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/local");
        let mut c = NodeConfig::load(&dir.join("node-1.toml")).unwrap();
        for ok in [0, MAX_PAYMENT_DEFERRAL_LIMIT_MS] {
            c.payment.max_payment_deferral_ms = ok;
            assert!(c.validate().is_ok());
        }
        c.payment.max_payment_deferral_ms = MAX_PAYMENT_DEFERRAL_LIMIT_MS + 1;
        assert_eq!(c.validate().unwrap_err().0, "payment.max_payment_deferral_ms");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<NodeConfig>("node_id = 1\nlisten_addr = \"127.0.0.1:1\"\ndata_dir = \"x\"\ngroupz = 3\n")
            .unwrap_err();
        assert!(err.to_string().contains("groupz"), "{err}");
    }
}
