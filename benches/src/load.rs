//! The workloads of the load generator, measured with HDR histograms. A run that loses or
//! invents money is void: afterwards every packet's claims must sum to its total.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;
use futures::TryStreamExt;
use hdrhistogram::Histogram;
use redpacket_client::Client;
use redpacket_client::Error;
use redpacket_client::NewPacket;
use redpacket_client::Recipients;

use crate::cpu::CpuMeter;
use crate::cpu::CpuSample;
use crate::local::ClusterFigures;
use crate::local::LocalCluster;

/// What a race measures of the systems under test, besides its own timings: sampled when
/// the race starts and when it ends, so neither the set-up (creating the packets) nor the
/// refusals after the race are counted.
pub struct RaceMeter<'a> {
    pub cpu: CpuMeter,
    /// The local cluster's own counters (log entries, fsyncs), when the bench started it.
    pub cluster: Option<&'a LocalCluster>,
}

impl RaceMeter<'_> {
    /// Only this process's CPU (a peer, or a cluster the bench did not start).
    pub fn this_process<'a>() -> RaceMeter<'a> {
        RaceMeter { cpu: CpuMeter::this_process(), cluster: None }
    }

    /// Every process of a local cluster, and its counters.
    pub fn cluster(cluster: &LocalCluster) -> RaceMeter<'_> {
        RaceMeter { cpu: cluster.cpu_meter(), cluster: Some(cluster) }
    }

    async fn figures(&self) -> anyhow::Result<Option<ClusterFigures>> {
        match self.cluster {
            Some(c) => Ok(Some(c.figures().await?)),
            None => Ok(None),
        }
    }
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub workload: &'static str,
    pub elapsed: Duration,
    pub grabs: u64,
    pub attempts: u64,
    pub sold_out: u64,
    /// Attempts turned away by admission control (and retried).
    pub busy: u64,
    pub errors: u64,
    pub packets: u64,
    /// Latency of successful grabs (µs).
    pub grab_latency: Option<Histogram<u64>>,
    /// Latency of sold-out answers during the race (µs): grabs that were already in flight
    /// when the last share went.
    pub sold_out_latency: Option<Histogram<u64>>,
    /// After the race: latency of grabs by new users of a sold-out packet (µs).
    pub refusal_latency: Option<Histogram<u64>>,
    /// After the race: latency of repeated grabs by users who hold a share (µs).
    pub duplicate_latency: Option<Histogram<u64>>,
    pub verified: bool,
    /// For redpacket: how long after the race every payment had reached the ledger (the
    /// books then reconciled, or the run is void). The peers pay as they grab.
    pub settled_after: Option<Duration>,
    /// CPU seconds each watched process (by role) spent during the race.
    pub cpu: CpuSample,
    /// The local cluster's counters over the race, when the bench started the cluster.
    pub cluster: Option<ClusterFigures>,
}

impl Outcome {
    pub fn grabs_per_second(&self) -> f64 {
        self.grabs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn quantiles(h: &Option<Histogram<u64>>) -> (f64, f64, f64) {
        match h {
            Some(h) if !h.is_empty() => (
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
            ),
            _ => (0.0, 0.0, 0.0),
        }
    }

    /// Microseconds of CPU per successful grab, by role, over the race.
    pub fn cpu_per_grab_us(&self) -> Vec<(&'static str, f64)> {
        self.cpu.0.iter().map(|(role, s)| (*role, s * 1e6 / self.grabs.max(1) as f64)).collect()
    }

    fn cpu_line(&self) -> String {
        let per_grab: Vec<String> = self.cpu_per_grab_us().iter().map(|(role, us)| format!("{role} {us:.1}")).collect();
        let busy: f64 = self.cpu.0.iter().map(|(_, s)| s).sum::<f64>() / self.elapsed.as_secs_f64().max(1e-9);
        format!("  CPU µs per grab: {} · {busy:.2} cores busy", per_grab.join(" · "))
    }

    /// WAL fsyncs per second of the race, summed over the nodes.
    pub fn fsyncs_per_second(&self) -> Option<f64> {
        self.cluster.map(|c| c.wal_syncs / self.elapsed.as_secs_f64().max(1e-9))
    }

    fn cluster_line(&self) -> String {
        match (self.cluster, self.fsyncs_per_second()) {
            (Some(c), Some(per_s)) => format!(
                "\n  cluster over the race (3 nodes): {:.0} Batch entries carrying {:.0} grabs/opens ({:.1} per entry) · {:.0} WAL fsyncs ({per_s:.0}/s) · {:.0} BUSY answers",
                c.batches,
                c.batched_ops,
                c.ops_per_entry(),
                c.wal_syncs,
                c.admission_refused
            ),
            _ => String::new(),
        }
    }

    pub fn table(&self) -> String {
        let (p50, p99, p999) = Self::quantiles(&self.grab_latency);
        let (s50, s99, _) = Self::quantiles(&self.sold_out_latency);
        let (r50, r99, r999) = Self::quantiles(&self.refusal_latency);
        let (d50, d99, d999) = Self::quantiles(&self.duplicate_latency);
        format!(
            "workload {} · {:.1} s · {} packets\n  grabs/s {:>10.0}   grabs {:>8}   attempts {:>8}   sold out {:>8}   busy {:>8}   errors {}\n  grab latency ms    p50 {p50:.2}  p99 {p99:.2}  p99.9 {p999:.2}\n  sold-out (in race) ms p50 {s50:.2}  p99 {s99:.2}\n  after sold out, ms: new user p50 {r50:.3} p99 {r99:.3} p99.9 {r999:.3} · repeat grab p50 {d50:.3} p99 {d99:.3} p99.9 {d999:.3}\n{}{}\n  money verified: {}{}",
            self.workload,
            self.elapsed.as_secs_f64(),
            self.packets,
            self.grabs_per_second(),
            self.grabs,
            self.attempts,
            self.sold_out,
            self.busy,
            self.errors,
            self.cpu_line(),
            self.cluster_line(),
            if self.verified { "every packet's claims sum to its total" } else { "NO — this run is void" },
            match self.settled_after {
                Some(after) => format!("\n  payments settled {:.1} s after the race; the books reconcile", after.as_secs_f64()),
                None => String::new(),
            }
        )
    }

    pub fn json(&self) -> String {
        let (p50, p99, p999) = Self::quantiles(&self.grab_latency);
        let (s50, s99, _) = Self::quantiles(&self.sold_out_latency);
        let (r50, r99, _) = Self::quantiles(&self.refusal_latency);
        let (d50, d99, _) = Self::quantiles(&self.duplicate_latency);
        let mut json = serde_json::json!({
            "workload": self.workload, "elapsed_s": self.elapsed.as_secs_f64(), "packets": self.packets,
            "grabs": self.grabs, "grabs_per_s": self.grabs_per_second(), "attempts": self.attempts,
            "sold_out": self.sold_out, "busy": self.busy, "errors": self.errors,
            "grab_p50_ms": p50, "grab_p99_ms": p99, "grab_p999_ms": p999,
            "sold_out_p50_ms": s50, "sold_out_p99_ms": s99,
            "refusal_p50_ms": r50, "refusal_p99_ms": r99, "duplicate_p50_ms": d50, "duplicate_p99_ms": d99,
            "verified": self.verified,
            "settled_after_s": self.settled_after.map(|d| d.as_secs_f64()),
            "cpu_us_per_grab": self.cpu_per_grab_us().into_iter().map(|(role, us)| (role.to_string(), serde_json::json!(us))).collect::<serde_json::Map<_, _>>(),
        });
        if let (Some(c), Some(per_s), Some(fields)) = (self.cluster, self.fsyncs_per_second(), json.as_object_mut()) {
            fields.insert("log_entries".into(), c.batches.into());
            fields.insert("ops_per_entry".into(), c.ops_per_entry().into());
            fields.insert("wal_fsyncs".into(), c.wal_syncs.into());
            fields.insert("wal_fsyncs_per_s".into(), per_s.into());
        }
        json.to_string()
    }
}

/// Packets created at once while setting up a race.
const CREATE_CONCURRENCY: usize = 32;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Shared counters and histograms of the racing tasks.
#[derive(Default)]
struct Tally {
    grabs: AtomicU64,
    attempts: AtomicU64,
    sold_out: AtomicU64,
    busy: AtomicU64,
    errors: AtomicU64,
}

/// What one grab attempt ended in, whatever the system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The user got a share (and, for redpacket, opened it).
    Won,
    /// No share left.
    SoldOut,
    /// Turned away for now (admission control); the share may still be there.
    Busy,
    /// Anything else: an error.
    Failed,
}

/// A system the race can be run against: redpacket, or one of the designs it is compared
/// with (`crate::peers`). The workload is the same for all: create packets, let distinct
/// users grab until every packet is sold out, then check the money.
pub trait Target: Clone + Send + Sync + 'static {
    /// Creates a packet of `shares` shares summing to `total_cents`; returns its id.
    fn create(&self, total_cents: u64, shares: u32) -> impl Future<Output = anyhow::Result<String>> + Send;
    /// `user` grabs a share of `packet`.
    fn grab(&self, packet: &str, user: &str) -> impl Future<Output = Attempt> + Send;
    /// Every packet is fully taken and its shares sum exactly to its total.
    fn verify(&self, packets: &[String]) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// Waits until every transfer the race caused has reached the ledger, then checks the
    /// books: `Some(reconciled)`, or `None` for a system whose grab is the whole payment.
    fn settle(&self) -> impl Future<Output = anyhow::Result<Option<bool>>> + Send {
        async { Ok(None) }
    }
}

/// redpacket through its client crate. A grab is `grab_and_open`: the user's share is taken,
/// revealed and its payment recorded in the log, all in one acknowledged round trip.
#[derive(Clone)]
pub struct Redpacket(pub Client);

impl Target for Redpacket {
    async fn create(&self, total_cents: u64, shares: u32) -> anyhow::Result<String> {
        let p = self.0.create_packet(NewPacket::lucky("bench-sender", total_cents, shares, Recipients::Anyone)).await?;
        Ok(p.packet_id)
    }

    async fn grab(&self, packet: &str, user: &str) -> Attempt {
        match self.0.grab_and_open(packet, user).await {
            Ok(_) => Attempt::Won,
            Err(Error::SoldOut(_)) => Attempt::SoldOut,
            Err(Error::Busy(_)) => Attempt::Busy,
            Err(_) => Attempt::Failed,
        }
    }

    async fn verify(&self, packets: &[String]) -> anyhow::Result<bool> {
        verify(&self.0, packets).await
    }

    async fn settle(&self) -> anyhow::Result<Option<bool>> {
        Ok(Some(crate::mixed::settle_and_reconcile(&self.0).await?))
    }
}

/// `packets` packets of `shares` shares raced by `concurrency` tasks of distinct users, each
/// task grabbing random unfinished packets until all are sold out. `hot` is one packet.
///
/// Afterwards, `refusals.0` more attempts on the sold-out packets by `refusals.1` concurrent
/// clients measure how fast the answers that cannot change come back: half by new users
/// (sold out), half by users who already hold a share (their share again). A new user winning
/// then would be an oversale: the run is void. (Fewer clients than in the race: with 256
/// clients in a closed loop, latency is only 256 / throughput, whatever the path.)
pub async fn race<T: Target>(
    target: &T,
    name: &'static str,
    packets: u64,
    shares: u32,
    concurrency: usize,
    refusals: (u64, usize),
    meter: &RaceMeter<'_>,
) -> anyhow::Result<Outcome> {
    // Set-up, not measured: created a few at a time (each create waits for its funding).
    let ids: Vec<String> = futures::stream::iter(0..packets)
        .map(|_| target.create(u64::from(shares) * 100, shares))
        .buffered(CREATE_CONCURRENCY)
        .try_collect()
        .await?;
    let ids = Arc::new(ids);
    let open: Arc<Vec<AtomicBool>> = Arc::new((0..ids.len()).map(|_| AtomicBool::new(true)).collect());
    let remaining = Arc::new(AtomicU64::new(ids.len() as u64));
    let tally = Arc::new(Tally::default());
    let next_user = Arc::new(AtomicU64::new(0));
    // Each task's histograms are made before the clock starts: a few hundred KB each, and
    // zeroing 512 of them took tens of milliseconds of the race's start.
    let histograms: Vec<_> = (0..concurrency).map(|_| (histogram(), histogram())).collect();
    let figures_before = meter.figures().await?;
    let cpu_before = meter.cpu.sample();
    let started = Instant::now();
    let reporter = {
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!("  … {} grabs, {} attempts", tally.grabs.load(Ordering::Relaxed), tally.attempts.load(Ordering::Relaxed));
            }
        })
    };
    let tasks: Vec<_> = histograms
        .into_iter()
        .enumerate()
        .map(|(t, (mut grab_h, mut sold_h))| {
            let (target, ids, open, remaining, tally, next_user) =
                (target.clone(), ids.clone(), open.clone(), remaining.clone(), tally.clone(), next_user.clone());
            tokio::spawn(async move {
                let mut winners = Vec::new();
                // Each task starts at its own place and walks every packet in turn.
                let mut pick = (t * 7919) % ids.len();
                let mut skipped = 0u32;
                while remaining.load(Ordering::Relaxed) > 0 {
                    pick = (pick + 1) % ids.len();
                    if !open[pick].load(Ordering::Relaxed) {
                        skipped += 1;
                        if skipped.is_multiple_of(256) {
                            tokio::task::yield_now().await;
                        }
                        continue;
                    }
                    let n = next_user.fetch_add(1, Ordering::Relaxed);
                    let user = format!("bench-user-{n}");
                    let t0 = Instant::now();
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    match target.grab(&ids[pick], &user).await {
                        Attempt::Won => {
                            let _ = grab_h.record(t0.elapsed().as_micros() as u64);
                            winners.push((pick, n));
                            tally.grabs.fetch_add(1, Ordering::Relaxed);
                        }
                        Attempt::SoldOut => {
                            let _ = sold_h.record(t0.elapsed().as_micros() as u64);
                            tally.sold_out.fetch_add(1, Ordering::Relaxed);
                            if open[pick].swap(false, Ordering::Relaxed) {
                                remaining.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                        Attempt::Busy => {
                            tally.busy.fetch_add(1, Ordering::Relaxed);
                            // The few shares left are spoken for by grabs in flight: come back
                            // shortly rather than hammer the leader.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Attempt::Failed => {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                (grab_h, sold_h, winners)
            })
        })
        .collect();
    let mut grab_latency = histogram();
    let mut sold_out_latency = histogram();
    let mut winners = Vec::new();
    for t in tasks {
        let (g, s, w) = t.await?;
        grab_latency.add(&g)?;
        sold_out_latency.add(&s)?;
        winners.extend(w);
    }
    let elapsed = started.elapsed();
    let cpu = meter.cpu.sample().since(&cpu_before);
    reporter.abort();
    let cluster = match (meter.figures().await?, figures_before) {
        (Some(after), Some(before)) => Some(after.since(before)),
        _ => None,
    };
    let after = refuse(target, &ids, Arc::new(winners), next_user.load(Ordering::Relaxed), refusals.1, refusals.0).await?;
    let mut verified = after.oversold == 0 && target.verify(&ids).await?;
    if after.oversold > 0 {
        eprintln!("{} new users got a share of a sold-out packet: oversale", after.oversold);
    }
    let settled_after = match target.settle().await? {
        Some(reconciled) => {
            if !reconciled {
                eprintln!("the payments did not all settle within a minute, or the books do not reconcile");
            }
            verified &= reconciled;
            Some((started + elapsed).elapsed())
        }
        None => None,
    };
    Ok(Outcome {
        workload: name,
        elapsed,
        grabs: tally.grabs.load(Ordering::Relaxed),
        attempts: tally.attempts.load(Ordering::Relaxed),
        sold_out: tally.sold_out.load(Ordering::Relaxed),
        busy: tally.busy.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        packets,
        grab_latency: Some(grab_latency),
        sold_out_latency: Some(sold_out_latency),
        refusal_latency: Some(after.sold_out),
        duplicate_latency: Some(after.duplicate),
        verified,
        settled_after,
        cpu,
        cluster,
    })
}

/// What the attempts after the race measured.
struct AfterRace {
    sold_out: Histogram<u64>,
    duplicate: Histogram<u64>,
    /// New users who won a share of a sold-out packet (must be 0).
    oversold: u64,
}

/// `total` grabs on sold-out packets by `concurrency` tasks, alternating new users (from
/// `first_new_user` on) and winners of the race grabbing again.
async fn refuse<T: Target>(
    target: &T,
    ids: &Arc<Vec<String>>,
    winners: Arc<Vec<(usize, u64)>>,
    first_new_user: u64,
    concurrency: usize,
    total: u64,
) -> anyhow::Result<AfterRace> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (target, ids, winners, next) = (target.clone(), ids.clone(), winners.clone(), next.clone());
            tokio::spawn(async move {
                let (mut sold_h, mut dup_h, mut oversold) = (histogram(), histogram(), 0u64);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let repeat = i % 2 == 1 && !winners.is_empty();
                    let (pick, user) = if repeat {
                        let (pick, n) = winners[(i / 2) as usize % winners.len()];
                        (pick, format!("bench-user-{n}"))
                    } else {
                        ((i / 2) as usize % ids.len(), format!("bench-user-{}", first_new_user + i))
                    };
                    let t0 = Instant::now();
                    let attempt = target.grab(&ids[pick], &user).await;
                    let micros = t0.elapsed().as_micros() as u64;
                    match (repeat, attempt) {
                        (true, _) => {
                            let _ = dup_h.record(micros);
                        }
                        (false, Attempt::Won) => oversold += 1,
                        (false, _) => {
                            let _ = sold_h.record(micros);
                        }
                    }
                }
                (sold_h, dup_h, oversold)
            })
        })
        .collect();
    let mut after = AfterRace { sold_out: histogram(), duplicate: histogram(), oversold: 0 };
    for t in tasks {
        let (s, d, o) = t.await?;
        after.sold_out.add(&s)?;
        after.duplicate.add(&d)?;
        after.oversold += o;
    }
    Ok(after)
}

/// Every packet is sold out and opened, and its claims sum exactly to its total.
async fn verify(client: &Client, ids: &[String]) -> anyhow::Result<bool> {
    for id in ids {
        let p = client.get_packet(id).await?;
        let sum: u64 = p.claims.iter().filter_map(|c| c.amount_cents).sum();
        if p.shares_grabbed != p.shares || p.shares_opened != p.shares || sum != p.total_cents {
            eprintln!("packet {id}: {} of {} grabbed, {} opened, {sum} of {} cents", p.shares_grabbed, p.shares, p.shares_opened, p.total_cents);
            return Ok(false);
        }
    }
    Ok(true)
}
