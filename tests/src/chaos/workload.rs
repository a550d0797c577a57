//! The workload: concurrent clients sending packets of both kinds and both recipient shapes,
//! and grabbing, opening and reading them, including one hot packet everybody races for.
//! Each client retries through timeouts and leader changes as the client crate does; what it
//! could not get an answer for is recorded as unknown.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use rand::RngExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use redpacket_client::Client;
use redpacket_client::Error;
use redpacket_client::NewPacket;
use redpacket_client::Recipients;
use tokio::time::Instant;

use super::history::History;
use super::history::Op;
use super::history::Outcome;

/// Senders funded before the run.
pub const SENDERS: [&str; 4] = ["s1", "s2", "s3", "s4"];
const USERS: u32 = 400;

/// What the workload knows about: packets it created (id, group members if any).
#[derive(Default)]
pub struct Known {
    pub packets: Vec<String>,
}

fn classify(e: &Error) -> Outcome {
    match e {
        Error::Unavailable { .. } => Outcome::Unknown { message: e.to_string() },
        Error::Status(s)
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown) =>
        {
            Outcome::Unknown { message: e.to_string() }
        }
        other => Outcome::Fail { reason: other.to_string() },
    }
}

/// Runs one client until `deadline`.
pub async fn worker(id: usize, seed: u64, client: Client, history: History, known: Arc<Mutex<Known>>, hot: String, deadline: Instant) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let process = format!("client-{id}");
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let user = format!("u{}", rng.random_range(0..USERS));
        let pick: u32 = rng.random_range(0..100);
        let target = {
            let k = known.lock().expect("known");
            if k.packets.is_empty() || rng.random_bool(0.4) { hot.clone() } else { k.packets[rng.random_range(0..k.packets.len())].clone() }
        };
        let start = history.now_ms();
        match pick {
            0..10 => {
                let sender = SENDERS[rng.random_range(0..SENDERS.len())];
                let shares = rng.random_range(1..=20u32);
                let equal = rng.random_bool(0.3);
                let total = if equal { u64::from(shares) * rng.random_range(1..=200u64) } else { rng.random_range(u64::from(shares)..=5_000) };
                let group = rng.random_bool(0.5);
                let recipients = if group {
                    Recipients::Group((0..40).map(|_| format!("u{}", rng.random_range(0..USERS))).collect())
                } else {
                    Recipients::Anyone
                };
                let mut new = if equal {
                    NewPacket::equal(sender, total, shares, recipients)
                } else {
                    NewPacket::lucky(sender, total, shares, recipients)
                };
                new.request_id = format!("{process}-{n}");
                let op = Op::Create { request_id: new.request_id.clone(), sender: sender.into(), total, shares, equal, group };
                let outcome = match client.create_packet(new).await {
                    Ok(p) => {
                        known.lock().expect("known").packets.push(p.packet_id.clone());
                        Outcome::Created { packet_id: p.packet_id }
                    }
                    Err(e) => classify(&e),
                };
                history.record(&process, start, op, outcome);
            }
            10..50 => {
                let outcome = match client.grab_and_open(&target, &user).await {
                    Ok(s) => Outcome::Opened { share_index: s.share_index, amount: s.amount_cents },
                    Err(e) => classify(&e),
                };
                history.record(&process, start, Op::GrabOpen { packet_id: target, user }, outcome);
            }
            50..70 => {
                let outcome = match client.grab(&target, &user).await {
                    Ok(s) => Outcome::Grabbed { share_index: s.share_index },
                    Err(e) => classify(&e),
                };
                history.record(&process, start, Op::Grab { packet_id: target, user }, outcome);
            }
            70..85 => {
                let outcome = match client.open(&target, &user).await {
                    Ok(s) => Outcome::Opened { share_index: s.share_index, amount: s.amount_cents },
                    Err(e) => classify(&e),
                };
                history.record(&process, start, Op::Open { packet_id: target, user }, outcome);
            }
            _ => {
                let outcome = match client.get_packet(&target).await {
                    Ok(p) => Outcome::Read { grabbed: p.shares_grabbed, opened: p.shares_opened },
                    Err(e) => classify(&e),
                };
                history.record(&process, start, Op::Read { packet_id: target }, outcome);
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    }
}
