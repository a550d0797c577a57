//! `RedPacket/Batch`: many grabs and opens in one request.
//!
//! A gateway serving many users sends their calls together (the client crate gathers
//! concurrent calls to one node). Each item runs exactly as its single call would, with
//! its own validation, metrics, log span, forwarding and leader hint, and all run side by
//! side, so they reach their group's batcher together and share log entries. Each item's
//! answer is the status its single call would have ended with.
//!
//! `RedPacket/BatchStream` carries the same requests on one long-lived stream, so a gateway
//! pays no HTTP/2 stream, headers, trailers or server task per request. Each message is
//! served exactly as a `Batch` request, and answered with its `seq` as soon as it is done.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use redpacket_proto::LEADER_METADATA_KEY;
use redpacket_proto::MAX_BATCH_ITEMS;
use redpacket_proto::REASON_METADATA_KEY;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::red_packet_server::RedPacket;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::FORWARDED_HEADER;
use super::packets::PacketService;
use super::status;
use crate::metrics::Metrics;

/// Answers every item of `request`, in order.
pub async fn serve(service: &PacketService, request: Request<pb::BatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
    let forwarded = request.metadata().contains_key(FORWARDED_HEADER);
    let items = request.into_inner().items;
    if items.len() > MAX_BATCH_ITEMS {
        return Err(status::invalid("items", format!("{} items; at most {MAX_BATCH_ITEMS} per request", items.len())));
    }
    let answers = items.into_iter().enumerate().map(|(i, item)| answer(service, i, item, forwarded));
    // Unconstrained: tokio's cooperative budget (128 operations per poll) would otherwise
    // stop this task part-way through a large request, the group's batcher would propose the
    // first part alone, and every item of the request would wait for two log entries.
    let results = tokio::task::unconstrained(futures::future::join_all(answers)).await;
    Ok(Response::new(pb::BatchResponse { results, seq: 0 }))
}

/// The answers of one `BatchStream`.
pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<pb::BatchResponse, Status>> + Send + 'static>>;

/// Requests of one stream served at once. The client crate has at most 4 in flight per node;
/// this bounds what another sender can make one stream hold. They run in the stream's own task
/// (a task spawned per request was measured, 3 alternating pairs of `many`: no gain).
const STREAM_REQUESTS_AT_ONCE: usize = 64;

/// Serves every request message of a `BatchStream` as [`serve`] serves a `Batch` request, side by
/// side, and answers each with its `seq` as soon as it is done.
///
/// The stream ends when the sender closes its half, or when this node starts to stop
/// (`draining`): then no further message is read, the ones read are answered, and the stream
/// ends, so that the server's graceful stop does not wait for the gateway. The gateway fails the
/// requests it sent meanwhile as UNAVAILABLE and retries them elsewhere. A request the unary call
/// would refuse as a whole (more than [`MAX_BATCH_ITEMS`] items) ends the stream with that status.
pub fn serve_stream(
    service: PacketService,
    mut draining: tokio::sync::watch::Receiver<bool>,
    metrics: &Arc<Metrics>,
    request: Request<Streaming<pb::BatchRequest>>,
) -> Result<Response<AnswerStream>, Status> {
    if *draining.borrow() {
        return Err(Status::unavailable("node is stopping; retry"));
    }
    // Counts the stream as open until it is dropped, whichever way it ends: the closure below
    // owns it, and the stream owns the closure.
    let open = metrics.batch_stream_open();
    let forwarded = request.metadata().contains_key(FORWARDED_HEADER);
    let drained = async move {
        let _ = draining.wait_for(|draining| *draining).await;
    };
    // A broken request half ends the stream like a closed one.
    let requests = tokio_stream::StreamExt::map_while(request.into_inner(), |message| message.ok());
    let answers = requests
        .take_until(drained)
        .map(move |message| {
            let _owned_by_the_stream = &open;
            let service = service.clone();
            async move {
                let seq = message.seq;
                let mut answer = service.batch(self::request(forwarded, message)).await?.into_inner();
                answer.seq = seq;
                Ok(answer)
            }
        })
        .buffer_unordered(STREAM_REQUESTS_AT_ONCE);
    Ok(Response::new(Box::pin(answers)))
}

/// One item, through the single call's handler.
async fn answer(service: &PacketService, i: usize, item: pb::BatchItem, forwarded: bool) -> pb::BatchResult {
    let (packet_id, user) = (item.packet_id, item.user);
    match pb::Operation::try_from(item.operation) {
        Ok(pb::Operation::Grab) => result(service.grab(request(forwarded, pb::GrabRequest { packet_id, user })).await, |r, g| {
            r.share_index = g.share_index;
            r.shares_left = g.shares_left;
        }),
        Ok(pb::Operation::Open) => result(service.open(request(forwarded, pb::OpenRequest { packet_id, user })).await, opened),
        Ok(pb::Operation::GrabAndOpen) => result(service.grab_and_open(request(forwarded, pb::GrabRequest { packet_id, user })).await, opened),
        _ => result::<()>(Err(status::invalid(&format!("items[{i}].operation"), "must be OPERATION_GRAB, OPERATION_OPEN or OPERATION_GRAB_AND_OPEN")), |_, _| ()),
    }
}

/// An item as its single call's request (forwarded when the batch was).
fn request<T>(forwarded: bool, body: T) -> Request<T> {
    let mut request = Request::new(body);
    if forwarded {
        request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    }
    request
}

fn opened(r: &mut pb::BatchResult, o: pb::OpenResponse) {
    r.share_index = o.share_index;
    r.amount_cents = o.amount_cents;
}

/// A single call's outcome as a batch result: its code, message, reason and leader hint.
fn result<T>(outcome: Result<Response<T>, Status>, fill: impl FnOnce(&mut pb::BatchResult, T)) -> pb::BatchResult {
    let (metadata, body, code, message) = match outcome {
        Ok(response) => {
            let (metadata, body, _) = response.into_parts();
            (metadata, Some(body), tonic::Code::Ok, String::new())
        }
        Err(status) => (status.metadata().clone(), None, status.code(), status.message().to_string()),
    };
    let text = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut r = pb::BatchResult {
        code: code as i32,
        message,
        reason: text(REASON_METADATA_KEY),
        leader: text(LEADER_METADATA_KEY),
        ..Default::default()
    };
    if let Some(body) = body {
        fill(&mut r, body);
    }
    r
}
