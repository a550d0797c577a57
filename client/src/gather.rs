//! Gathering: concurrent grabs and opens bound for the same node travel in one
//! `RedPacket/Batch` request.
//!
//! A service client (a gateway) serves many users at once. Sent one request per user, a hot
//! packet's race is dominated by per-request costs on both sides: HTTP/2 frames, syscalls
//! and task wake-ups. So each endpoint has one gathering task. A call queues its item and
//! waits for its own answer; the task sends whatever is queued as one request as soon as
//! fewer than [`MAX_IN_FLIGHT`] requests are in flight. A lone call is therefore sent at
//! once (there is no timer, so nothing waits for company), and the calls that arrive while
//! the node is busy share the next request.
//!
//! Each item's answer comes back as the status the single call would have ended with (code,
//! message, `redpacket-reason`, leader hint), so retrying, leader hints and errors work
//! exactly as for single calls.

use std::sync::Arc;
use std::sync::OnceLock;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redpacket_proto::LEADER_METADATA_KEY;
use redpacket_proto::MAX_BATCH_ITEMS;
use redpacket_proto::REASON_METADATA_KEY;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::red_packet_client::RedPacketClient;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::AuthChannel;

/// Batch requests one endpoint may have in flight at once. More than one lets a request
/// travel while the node still answers the previous one; a few suffice, since the node
/// batches again into its log.
pub const MAX_IN_FLIGHT: usize = 4;
/// Deadline of one batch request, so a node that stops answering (but keeps its connection)
/// cannot hold the endpoint's in-flight slots forever. Each caller's own attempt deadline
/// (the retry policy's) still applies; this one frees the slot.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An item's answer: the single call's response or status.
pub type Answer = Result<tonic::Response<pb::BatchResult>, Status>;

struct Queued {
    item: pb::BatchItem,
    reply: oneshot::Sender<Answer>,
}

/// The gathering task of one endpoint, started on first use (inside the caller's runtime).
#[derive(Clone)]
pub struct Gatherer {
    channel: AuthChannel,
    queue: Arc<OnceLock<mpsc::Sender<Queued>>>,
}

impl Gatherer {
    pub fn new(channel: AuthChannel) -> Self {
        Gatherer { channel, queue: Arc::new(OnceLock::new()) }
    }

    /// Sends `item` in the endpoint's next batch request and waits for its answer.
    pub async fn call(&self, item: pb::BatchItem) -> Answer {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(4 * MAX_BATCH_ITEMS);
            tokio::spawn(run(self.channel.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        match queue.send(Queued { item, reply }).await {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(Status::unavailable("batch request dropped; retry"))),
            // The task is gone (its runtime shut down): send this item on its own.
            Err(mpsc::error::SendError(q)) => send_alone(self.channel.clone(), q.item).await,
        }
    }
}

async fn send_alone(channel: AuthChannel, item: pb::BatchItem) -> Answer {
    let resp = RedPacketClient::new(channel).batch(request(vec![item])).await?;
    match resp.into_inner().results.pop() {
        Some(result) => answer_of(result),
        None => Err(Status::internal("batch answer without a result")),
    }
}

async fn run(channel: AuthChannel, mut queue: mpsc::Receiver<Queued>) {
    let mut next: Vec<Queued> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !next.is_empty() || !in_flight.is_empty() {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            item = queue.recv(), if open && next.len() < MAX_BATCH_ITEMS => match item {
                Some(item) => next.push(item),
                None => open = false,
            },
            else => {}
        }
        take_queued(&mut queue, &mut next);
        if !next.is_empty() && in_flight.len() < MAX_IN_FLIGHT {
            // Let the callers that are already runnable queue first. One batch answer wakes
            // all its callers at once, and most call again at once: without this, the first
            // to come back would go out alone, and the rest would wait behind it.
            tokio::task::yield_now().await;
            take_queued(&mut queue, &mut next);
            let batch: Vec<Queued> = next.drain(..next.len().min(MAX_BATCH_ITEMS)).collect();
            in_flight.push(send(channel.clone(), batch));
        }
    }
}

/// Moves what is already queued into `next`, up to a full request.
fn take_queued(queue: &mut mpsc::Receiver<Queued>, next: &mut Vec<Queued>) {
    while next.len() < MAX_BATCH_ITEMS {
        match queue.try_recv() {
            Ok(item) => next.push(item),
            Err(_) => break,
        }
    }
}

/// Sends one batch request and hands every caller its answer.
async fn send(channel: AuthChannel, batch: Vec<Queued>) {
    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.item, q.reply)).unzip();
    match RedPacketClient::new(channel).batch(request(items)).await {
        Ok(resp) => {
            let results = resp.into_inner().results;
            if results.len() != replies.len() {
                let status = Status::internal(format!("batch of {} items answered with {} results", replies.len(), results.len()));
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(answer_of(result));
            }
        }
        // The request as a whole failed (node down, deadline): every item fails the same
        // way, and each caller's retry decides what to do.
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

fn request(items: Vec<pb::BatchItem>) -> tonic::Request<pb::BatchRequest> {
    let mut request = tonic::Request::new(pb::BatchRequest { items });
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

/// An item's result as the single call's response or status, with the same metadata.
fn answer_of(result: pb::BatchResult) -> Answer {
    let mut metadata = MetadataMap::new();
    if !result.leader.is_empty() {
        if let Ok(v) = result.leader.parse() {
            metadata.insert(LEADER_METADATA_KEY, v);
        }
    }
    if result.code == Code::Ok as i32 {
        let mut resp = tonic::Response::new(result);
        *resp.metadata_mut() = metadata;
        return Ok(resp);
    }
    if !result.reason.is_empty() {
        if let Ok(v) = result.reason.parse() {
            metadata.insert(REASON_METADATA_KEY, v);
        }
    }
    Err(Status::with_metadata(Code::from_i32(result.code), result.message, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn an_item_result_becomes_the_single_calls_response_or_status() {
        let ok = pb::BatchResult { code: 0, leader: "127.0.0.1:7002".into(), share_index: 3, amount_cents: 42, ..Default::default() };
        let resp = answer_of(ok).expect("code 0 is a response");
        assert_eq!(resp.metadata().get(LEADER_METADATA_KEY).unwrap(), "127.0.0.1:7002");
        assert_eq!((resp.get_ref().share_index, resp.get_ref().amount_cents), (3, 42));

        let sold_out = pb::BatchResult {
            code: Code::FailedPrecondition as i32,
            message: "packet p: sold out".into(),
            reason: "SOLD_OUT".into(),
            ..Default::default()
        };
        let status = answer_of(sold_out).expect_err("a refusal is a status");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "packet p: sold out");
        assert!(status.metadata().get(LEADER_METADATA_KEY).is_none(), "no leader named, none invented");
        assert!(matches!(Error::from_status(status), Error::SoldOut(m) if m == "packet p: sold out"));

        let invalid = pb::BatchResult { code: Code::InvalidArgument as i32, message: "user: empty".into(), reason: "INVALID_INPUT".into(), ..Default::default() };
        assert!(matches!(Error::from_status(answer_of(invalid).unwrap_err()), Error::InvalidArgument(m) if m.starts_with("user")));
        let moved = pb::BatchResult { code: Code::Unavailable as i32, message: "leadership changed; retry".into(), ..Default::default() };
        assert!(crate::is_retryable(&answer_of(moved).unwrap_err()), "an unavailable item is retried like a single call");
    }
}
