//! Prometheus metrics of a node, served as text on `GET /metrics` at `metrics_addr`.
//!
//! Request counts by method and status code and latency histograms are recorded by the
//! packet service as requests finish; Raft and storage figures (applied index, leader
//! changes, replication lag, unsettled transfers, RocksDB size) are sampled every second.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use openraft::type_config::async_runtime::WatchReceiver;
use prometheus::Encoder;
use prometheus::HistogramOpts;
use prometheus::HistogramVec;
use prometheus::IntCounterVec;
use prometheus::IntGauge;
use prometheus::IntGaugeVec;
use prometheus::Opts;
use prometheus::Registry;

use crate::raft::groups::Groups;
use crate::storage::Store;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    proposals: IntCounterVec,
    batch_ops: prometheus::Histogram,
    admission_refused: prometheus::IntCounter,
    wal_syncs: IntGauge,
    applied: IntGaugeVec,
    leader: IntGaugeVec,
    leader_changes: IntCounterVec,
    lag: IntGaugeVec,
    unsettled: IntGaugeVec,
    held_back: IntCounterVec,
    rocksdb_bytes: IntGauge,
    batch_streams: IntGauge,
    last_leader: Mutex<HashMap<u32, Option<u64>>>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are valid and unique")
}

impl Metrics {
    pub fn new(node_id: u64) -> Arc<Metrics> {
        let registry = Registry::new_custom(Some("redpacket".into()), Some(HashMap::from([("node".into(), node_id.to_string())])))
            .expect("registry");
        let requests = must(IntCounterVec::new(Opts::new("requests_total", "gRPC packet requests by method and status code"), &["method", "code"]));
        let latency = must(HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Latency of packet requests (grab, open, ...)")
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["method"],
        ));
        let proposals = must(IntCounterVec::new(Opts::new("raft_proposals_total", "Commands proposed by this node as group leader"), &["group"]));
        let batch_ops = must(prometheus::Histogram::with_opts(
            HistogramOpts::new("batch_operations", "Grabs and opens per Batch log entry proposed by this leader")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
        ));
        let admission_refused =
            must(prometheus::IntCounter::new("admission_refused_total", "Grabs answered BUSY by admission control"));
        let wal_syncs = must(IntGauge::new("wal_syncs_total", "fsyncs of the RocksDB WAL for Raft log appends (one covers every group)"));
        let applied = must(IntGaugeVec::new(Opts::new("raft_last_applied_index", "Last applied log index per group"), &["group"]));
        let leader = must(IntGaugeVec::new(Opts::new("raft_is_leader", "1 when this node leads the group"), &["group"]));
        let leader_changes = must(IntCounterVec::new(Opts::new("raft_leader_changes_total", "Leader changes seen per group"), &["group"]));
        let lag = must(IntGaugeVec::new(Opts::new("raft_replication_lag_entries", "Entries a follower is behind (on the leader)"), &["group", "follower"]));
        let unsettled = must(IntGaugeVec::new(Opts::new("unsettled_transfers", "Transfers recorded but not yet settled, per group"), &["group"]));
        let held_back = must(IntCounterVec::new(
            Opts::new("settlement_passes_held_back_total", "Settlement passes that left a racing group's payments for later (on its leader)"),
            &["group"],
        ));
        let rocksdb_bytes = must(IntGauge::new("rocksdb_size_bytes", "RocksDB SST files plus memtables"));
        let batch_streams =
            must(IntGauge::new("batch_streams_open", "Clients' BatchStreams open on this node (a client keeps one per node it sends to)"));
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(proposals.clone()),
            Box::new(batch_ops.clone()),
            Box::new(admission_refused.clone()),
            Box::new(wal_syncs.clone()),
            Box::new(applied.clone()),
            Box::new(leader.clone()),
            Box::new(leader_changes.clone()),
            Box::new(lag.clone()),
            Box::new(unsettled.clone()),
            Box::new(held_back.clone()),
            Box::new(rocksdb_bytes.clone()),
            Box::new(batch_streams.clone()),
        ] {
            must(registry.register(c));
        }
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            proposals,
            batch_ops,
            admission_refused,
            wal_syncs,
            applied,
            leader,
            leader_changes,
            lag,
            unsettled,
            held_back,
            rocksdb_bytes,
            batch_streams,
            last_leader: Mutex::default(),
        })
    }

    /// Records a finished request.
    pub fn request(&self, method: &str, started: Instant, code: tonic::Code) {
        self.requests.with_label_values(&[method, &format!("{code:?}")]).inc();
        self.latency.with_label_values(&[method]).observe(started.elapsed().as_secs_f64());
    }

    pub fn proposal(&self, group: u32) {
        self.proposals.with_label_values(&[&group.to_string()]).inc();
    }

    /// A batch of `ops` grabs and opens was proposed.
    pub fn batch(&self, ops: usize) {
        self.batch_ops.observe(ops as f64);
    }

    pub fn admission_refused(&self) {
        self.admission_refused.inc();
    }

    /// A settlement pass left the group's payments for later (it is racing).
    pub fn payments_held_back(&self, group: u32) {
        self.held_back.with_label_values(&[&group.to_string()]).inc();
    }

    /// Counts a client's `BatchStream` as open until the returned guard is dropped, with the stream.
    pub fn batch_stream_open(self: &Arc<Self>) -> OpenBatchStream {
        self.batch_streams.inc();
        OpenBatchStream(self.clone())
    }

    /// Samples Raft and storage figures (the fsync count is read at each scrape, in [`Metrics::render`]).
    pub fn sample(&self, groups: &Groups, store: &Store) {
        let me = groups.node_id();
        for (group, raft) in groups.all() {
            let g = group.to_string();
            let m = raft.metrics().borrow_watched().clone();
            self.applied.with_label_values(&[&g]).set(m.last_applied.as_ref().map(|l| l.index as i64).unwrap_or(0));
            self.leader.with_label_values(&[&g]).set(i64::from(m.current_leader == Some(me)));
            {
                let mut last = self.last_leader.lock().expect("metrics lock");
                let previous = last.insert(group, m.current_leader);
                if previous.is_some_and(|p| p != m.current_leader) && m.current_leader.is_some() {
                    self.leader_changes.with_label_values(&[&g]).inc();
                }
            }
            if let Some(replication) = &m.replication {
                for (follower, matched) in replication.iter().filter(|(id, _)| **id != me) {
                    let behind = m.last_log_index.unwrap_or(0).saturating_sub(matched.as_ref().map(|l| l.index).unwrap_or(0));
                    self.lag.with_label_values(&[&g, &follower.to_string()]).set(behind as i64);
                }
            }
            self.unsettled.with_label_values(&[&g]).set(store.reader(group).unsettled_count() as i64);
        }
        let db = store.db();
        let prop = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0);
        let mut bytes = prop("rocksdb.cur-size-all-mem-tables");
        for cf in crate::storage::keys::ALL_CFS {
            if let Some(h) = db.cf_handle(cf) {
                bytes += db.property_int_value_cf(h, "rocksdb.total-sst-files-size").ok().flatten().unwrap_or(0);
            }
        }
        self.rocksdb_bytes.set(bytes as i64);
    }

    pub fn render(&self) -> String {
        // Read at scrape time (one atomic load), so a scrape right after a burst counts its
        // fsyncs: the load generator reads it just before and just after a race.
        self.wal_syncs.set(crate::storage::wal_sync::syncs() as i64);
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// An open `BatchStream`, counted in `redpacket_batch_streams_open` while it lives.
pub struct OpenBatchStream(Arc<Metrics>);

impl Drop for OpenBatchStream {
    fn drop(&mut self) {
        self.0.batch_streams.dec();
    }
}

/// Samples every second until aborted.
pub async fn sample_forever(metrics: Arc<Metrics>, groups: Arc<Groups>, store: Store) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        metrics.sample(&groups, &store);
    }
}

/// Serves `GET /metrics` until aborted.
pub async fn serve(metrics: Arc<Metrics>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], metrics.render()) }
        }),
    );
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_passes_are_counted_per_group() {
        let metrics = Metrics::new(1);
        metrics.payments_held_back(3);
        metrics.payments_held_back(3);
        metrics.payments_held_back(0);
        let text = metrics.render();
        for expected in [
            r#"redpacket_settlement_passes_held_back_total{group="3",node="1"} 2"#,
            r#"redpacket_settlement_passes_held_back_total{group="0",node="1"} 1"#,
        ] {
            assert!(text.contains(expected), "missing {expected} in:\n{text}");
        }
    }
}
