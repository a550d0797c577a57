//! The `mixed` workload: what a chat app's traffic looks like rather than one race. Clients
//! create packets, grab shares of live packets as new users, open what they grabbed a moment
//! later, and read packets' details, in a set ratio, for a set time. Afterwards the run waits
//! for every transfer to settle and the cluster's reconcile must find every cent in place.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use hdrhistogram::Histogram;
use redpacket_client::Client;
use redpacket_client::Error;
use redpacket_client::NewPacket;
use redpacket_client::Recipients;

/// The operations, in the order of `Ratio`'s weights.
pub const OPS: [&str; 4] = ["create", "grab", "open", "read"];

/// Relative weights of create, grab, open and read.
#[derive(Debug, Clone, Copy)]
pub struct Ratio(pub [u32; 4]);

impl std::str::FromStr for Ratio {
    type Err = String;
    /// `create:grab:open:read`, e.g. `1:10:9:5`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<u32> = s.split(':').map(|p| p.trim().parse::<u32>()).collect::<Result<_, _>>().map_err(|e| format!("ratio: {e}"))?;
        let weights: [u32; 4] = parts.try_into().map_err(|_| "ratio: four weights, create:grab:open:read".to_string())?;
        if weights.iter().sum::<u32>() == 0 {
            return Err("ratio: at least one weight must be positive".into());
        }
        Ok(Ratio(weights))
    }
}

/// What a mixed run measured, per operation.
pub struct MixedOutcome {
    pub elapsed: Duration,
    pub counts: [u64; 4],
    pub errors: [u64; 4],
    pub latency: [Histogram<u64>; 4],
    pub reconciled: bool,
}

impl MixedOutcome {
    pub fn table(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let total: u64 = self.counts.iter().sum();
        let mut out = format!("workload mixed · {secs:.1} s · {:.0} operations/s\n", total as f64 / secs);
        for (i, op) in OPS.iter().enumerate() {
            let h = &self.latency[i];
            let q = |x: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(x) as f64 / 1000.0 };
            out += &format!(
                "  {op:<6} {:>8} ({:>7.0}/s)  errors {:>4}  ms p50 {:.2}  p99 {:.2}  p99.9 {:.2}\n",
                self.counts[i],
                self.counts[i] as f64 / secs,
                self.errors[i],
                q(0.5),
                q(0.99),
                q(0.999)
            );
        }
        out += &format!("  money reconciled: {}", if self.reconciled { "every transfer settled, no mismatch" } else { "NO — this run is void" });
        out
    }

    pub fn json(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut v = serde_json::json!({ "workload": "mixed", "elapsed_s": secs, "verified": self.reconciled });
        for (i, op) in OPS.iter().enumerate() {
            let h = &self.latency[i];
            let q = |x: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(x) as f64 / 1000.0 };
            v[*op] = serde_json::json!({
                "count": self.counts[i], "per_s": self.counts[i] as f64 / secs, "errors": self.errors[i],
                "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
            });
        }
        v.to_string()
    }
}

/// Packets still worth grabbing, and shares grabbed but not yet opened.
#[derive(Default)]
struct Pool {
    live: Vec<String>,
    unopened: Vec<(String, String)>,
    created: Vec<String>,
}

/// Packets kept live at most; older ones drop out of the grab pool.
const LIVE: usize = 256;

pub async fn run(client: &Client, ratio: Ratio, duration: Duration, concurrency: usize, shares: u32) -> anyhow::Result<MixedOutcome> {
    let pool = Arc::new(Mutex::new(Pool::default()));
    // Start with some packets so the first grabs have something to race for.
    for _ in 0..16 {
        let p = client.create_packet(NewPacket::lucky("bench-sender", u64::from(shares) * 100, shares, Recipients::Anyone)).await?;
        let mut pool = pool.lock().expect("pool");
        pool.live.push(p.packet_id.clone());
        pool.created.push(p.packet_id);
    }
    let next_user = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, pool, next_user) = (client.clone(), pool.clone(), next_user.clone());
            tokio::spawn(async move {
                let mut counts = [0u64; 4];
                let mut errors = [0u64; 4];
                let mut latency: [Histogram<u64>; 4] = std::array::from_fn(|_| Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"));
                let total: u32 = ratio.0.iter().sum();
                while started.elapsed() < duration {
                    let mut roll = rand::random_range(0..total);
                    let mut op = 0;
                    while roll >= ratio.0[op] {
                        roll -= ratio.0[op];
                        op += 1;
                    }
                    let t0 = Instant::now();
                    let ok = match op {
                        0 => match client.create_packet(NewPacket::lucky("bench-sender", u64::from(shares) * 100, shares, Recipients::Anyone)).await {
                            Ok(p) => {
                                let mut pool = pool.lock().expect("pool");
                                pool.live.push(p.packet_id.clone());
                                if pool.live.len() > LIVE {
                                    pool.live.remove(0);
                                }
                                pool.created.push(p.packet_id);
                                true
                            }
                            Err(_) => false,
                        },
                        1 => {
                            let picked = {
                                let pool = pool.lock().expect("pool");
                                (!pool.live.is_empty()).then(|| pool.live[rand::random_range(0..pool.live.len())].clone())
                            };
                            let Some(packet) = picked else { continue };
                            let user = format!("mixed-user-{}", next_user.fetch_add(1, Ordering::Relaxed));
                            match client.grab(&packet, &user).await {
                                Ok(_) => {
                                    pool.lock().expect("pool").unopened.push((packet, user));
                                    true
                                }
                                // Sold out and busy are answers, not errors.
                                Err(Error::SoldOut(_)) => {
                                    pool.lock().expect("pool").live.retain(|p| p != &packet);
                                    true
                                }
                                Err(Error::Busy(_)) => true,
                                Err(_) => false,
                            }
                        }
                        2 => {
                            let Some((packet, user)) = pool.lock().expect("pool").unopened.pop() else { continue };
                            client.open(&packet, &user).await.is_ok()
                        }
                        _ => {
                            let picked = {
                                let pool = pool.lock().expect("pool");
                                (!pool.created.is_empty()).then(|| pool.created[rand::random_range(0..pool.created.len())].clone())
                            };
                            let Some(packet) = picked else { continue };
                            client.get_packet(&packet).await.is_ok()
                        }
                    };
                    counts[op] += 1;
                    if ok {
                        let _ = latency[op].record(t0.elapsed().as_micros() as u64);
                    } else {
                        errors[op] += 1;
                    }
                }
                (counts, errors, latency)
            })
        })
        .collect();
    let mut counts = [0u64; 4];
    let mut errors = [0u64; 4];
    let mut latency: [Histogram<u64>; 4] = std::array::from_fn(|_| Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"));
    for t in tasks {
        let (c, e, l) = t.await?;
        for i in 0..4 {
            counts[i] += c[i];
            errors[i] += e[i];
            latency[i].add(&l[i])?;
        }
    }
    let elapsed = started.elapsed();
    let reconciled = settle_and_reconcile(client).await?;
    Ok(MixedOutcome { elapsed, counts, errors, latency, reconciled })
}

/// Waits (up to a minute) until no transfer is pending, then checks that reconcile finds no
/// mismatch and the ledger conserved.
pub async fn settle_and_reconcile(client: &Client) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = client.reconcile().await?;
        if report.pending_transfers == 0 || Instant::now() > deadline {
            if !report.mismatches.is_empty() {
                eprintln!("reconcile: {} mismatches, first: {:?}", report.mismatches.len(), report.mismatches[0]);
            }
            return Ok(report.pending_transfers == 0 && report.mismatches.is_empty() && report.ledger_conserved);
        }
        // Often enough to time settlement after a race to a quarter second.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
