//! Gathering: concurrent grabs and opens bound for the same node travel together, as one
//! request on the node's `RedPacket/BatchStream`.
//!
//! A service client (a gateway) serves many users at once. Sent one request per user, a hot
//! packet's race is dominated by per-request costs on both sides: HTTP/2 frames, syscalls
//! and task wake-ups. So each endpoint has one gathering task. A call queues its item and
//! waits for its own answer; the task sends whatever is queued as one request as soon as
//! fewer than [`MAX_IN_FLIGHT`] requests are in flight. A lone call is therefore sent at
//! once (there is no timer, so nothing waits for company), and the calls that arrive while
//! the node is busy share the next request.
//!
//! The requests go as messages on one long-lived stream per endpoint, opened on first use
//! and again after it ends: a message costs no HTTP/2 stream, headers, trailers or server
//! task of its own. When the stream ends (the node stops, the connection breaks) or a request
//! goes unanswered for [`REQUEST_TIMEOUT`], every request awaiting an answer on it fails with
//! that status, and each caller's retry decides what to do, as for a failed unary call. A node
//! that does not know `BatchStream` (an older version, during a rolling upgrade) gets unary
//! `RedPacket/Batch` calls until one of them fails as a whole; then a stream is tried again.
//!
//! Each item's answer comes back as the status the single call would have ended with (code,
//! message, `redpacket-reason`, leader hint), so retrying, leader hints and errors work
//! exactly as for single calls.

use std::collections::HashMap;
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
use tokio::time::Instant;
use tonic::Code;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::AuthChannel;

/// Batch requests one endpoint may have in flight at once. More than one lets a request
/// travel while the node still answers the previous one; a few suffice, since the node
/// batches again into its log. (With the stream, 2 and 8 were measured against 4 on `many`:
/// within the noise.)
pub const MAX_IN_FLIGHT: usize = 4;
/// How long one batch request may go unanswered, so a node that stops answering (but keeps
/// its connection) cannot hold the endpoint's in-flight slots forever. Each caller's own
/// attempt deadline (the retry policy's) still applies; this one frees the slots.
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
    let mut stream: Option<BatchStream> = None;
    // Unary requests in flight, to a node without `BatchStream`; each yields whether it failed
    // as a whole.
    let mut unary = FuturesUnordered::new();
    let mut unary_only = false;
    let mut check_deadlines = tokio::time::interval(REQUEST_TIMEOUT / 10);
    check_deadlines.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    loop {
        let awaiting = stream.as_ref().map_or(0, |s| s.awaiting.len());
        if !open && next.is_empty() && unary.is_empty() && awaiting == 0 {
            break;
        }
        tokio::select! {
            Some(failed) = unary.next(), if !unary.is_empty() => {
                if failed {
                    unary_only = false;
                }
            }
            answer = next_answer(&mut stream) => match answer {
                Ok(Some(answer)) => stream.as_mut().expect("answered by a stream").answered(answer),
                Ok(None) => end(&mut stream, Status::unavailable("the node ended the batch stream; retry")),
                Err(status) => end(&mut stream, status),
            },
            _ = check_deadlines.tick(), if awaiting > 0 => {
                if stream.as_ref().is_some_and(|s| s.overdue()) {
                    end(&mut stream, Status::deadline_exceeded(format!("no answer on the batch stream within {REQUEST_TIMEOUT:?}")));
                }
            }
            item = queue.recv(), if open && next.len() < MAX_BATCH_ITEMS => match item {
                Some(item) => next.push(item),
                None => open = false,
            },
        }
        take_queued(&mut queue, &mut next);
        let in_flight = unary.len() + stream.as_ref().map_or(0, |s| s.awaiting.len());
        if !next.is_empty() && in_flight < MAX_IN_FLIGHT {
            // Let the callers that are already runnable queue first. One batch answer wakes
            // all its callers at once, and most call again at once: without this, the first
            // to come back would go out alone, and the rest would wait behind it.
            tokio::task::yield_now().await;
            take_queued(&mut queue, &mut next);
            let batch: Vec<Queued> = next.drain(..next.len().min(MAX_BATCH_ITEMS)).collect();
            if !unary_only && stream.is_none() {
                match BatchStream::open(channel.clone()).await {
                    Ok(opened) => stream = Some(opened),
                    Err(status) if status.code() == Code::Unimplemented => unary_only = true,
                    Err(status) => {
                        fail(batch.into_iter().map(|q| q.reply), &status);
                        continue;
                    }
                }
            }
            // A stream is only ever opened while `unary_only` is off, so its presence decides.
            match stream.as_mut() {
                Some(sending) => {
                    if let Err(replies) = sending.send(batch) {
                        let closed = Status::unavailable("the batch stream closed; retry");
                        fail(replies.into_iter(), &closed);
                        end(&mut stream, closed);
                    }
                }
                None => unary.push(send(channel.clone(), batch)),
            }
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

/// One endpoint's `BatchStream`: its sending half, its answers, and the requests awaiting
/// an answer, by `seq`.
struct BatchStream {
    requests: mpsc::Sender<pb::BatchRequest>,
    answers: tonic::Streaming<pb::BatchResponse>,
    awaiting: HashMap<u64, Awaiting>,
    next_seq: u64,
}

struct Awaiting {
    replies: Vec<oneshot::Sender<Answer>>,
    sent: Instant,
}

impl BatchStream {
    async fn open(channel: AuthChannel) -> Result<Self, Status> {
        // Never more than MAX_IN_FLIGHT requests await an answer, so sending never waits.
        let (requests, outgoing) = mpsc::channel(MAX_IN_FLIGHT);
        let mut client = RedPacketClient::new(channel);
        let call = client.batch_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing));
        let answers = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| Status::deadline_exceeded(format!("opening the batch stream took over {REQUEST_TIMEOUT:?}")))??
            .into_inner();
        Ok(BatchStream { requests, answers, awaiting: HashMap::new(), next_seq: 0 })
    }

    /// Sends `batch` as the next request; gives its callers back when the stream is closed.
    fn send(&mut self, batch: Vec<Queued>) -> Result<(), Vec<oneshot::Sender<Answer>>> {
        let seq = self.next_seq;
        let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.item, q.reply)).unzip();
        if self.requests.try_send(pb::BatchRequest { items, seq }).is_err() {
            return Err(replies);
        }
        self.next_seq += 1;
        self.awaiting.insert(seq, Awaiting { replies, sent: Instant::now() });
        Ok(())
    }

    /// Hands each caller of the answered request its answer.
    fn answered(&mut self, answer: pb::BatchResponse) {
        let Some(awaiting) = self.awaiting.remove(&answer.seq) else {
            tracing::warn!(seq = answer.seq, "batch stream answer to no request; ignored");
            return;
        };
        deliver(awaiting.replies, answer.results);
    }

    /// Whether a request has waited longer than [`REQUEST_TIMEOUT`].
    fn overdue(&self) -> bool {
        self.awaiting.values().any(|a| a.sent.elapsed() > REQUEST_TIMEOUT)
    }
}

/// The stream's next answer; never ready when there is no stream.
async fn next_answer(stream: &mut Option<BatchStream>) -> Result<Option<pb::BatchResponse>, Status> {
    match stream {
        Some(stream) => stream.answers.message().await,
        None => std::future::pending().await,
    }
}

/// Ends the stream: every request awaiting an answer on it fails with `status`.
fn end(stream: &mut Option<BatchStream>, status: Status) {
    if let Some(ended) = stream.take() {
        fail(ended.awaiting.into_values().flat_map(|a| a.replies), &status);
    }
}

fn fail(replies: impl Iterator<Item = oneshot::Sender<Answer>>, status: &Status) {
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}

/// Hands every caller its item's answer, in order.
fn deliver(replies: Vec<oneshot::Sender<Answer>>, results: Vec<pb::BatchResult>) {
    if results.len() != replies.len() {
        let status = Status::internal(format!("batch of {} items answered with {} results", replies.len(), results.len()));
        return fail(replies.into_iter(), &status);
    }
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send(answer_of(result));
    }
}

/// Sends one unary batch request and hands every caller its answer; true when the request
/// failed as a whole.
async fn send(channel: AuthChannel, batch: Vec<Queued>) -> bool {
    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.item, q.reply)).unzip();
    match RedPacketClient::new(channel).batch(request(items)).await {
        Ok(resp) => {
            deliver(replies, resp.into_inner().results);
            false
        }
        // The request as a whole failed (node down, deadline): every item fails the same
        // way, and each caller's retry decides what to do.
        Err(status) => {
            fail(replies.into_iter(), &status);
            true
        }
    }
}

fn request(items: Vec<pb::BatchItem>) -> tonic::Request<pb::BatchRequest> {
    let mut request = tonic::Request::new(pb::BatchRequest { items, seq: 0 });
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

/// An item's result as the single call's response or status, with the same metadata.
fn answer_of(result: pb::BatchResult) -> Answer {
    let mut metadata = MetadataMap::new();
    if !result.leader.is_empty()
        && let Ok(v) = result.leader.parse()
    {
        metadata.insert(LEADER_METADATA_KEY, v);
    }
    if result.code == Code::Ok as i32 {
        let mut resp = tonic::Response::new(result);
        *resp.metadata_mut() = metadata;
        return Ok(resp);
    }
    if !result.reason.is_empty()
        && let Ok(v) = result.reason.parse()
    {
        metadata.insert(REASON_METADATA_KEY, v);
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

    /// How the fake node answers `BatchStream`.
    #[derive(Clone, Copy)]
    enum Streams {
        /// Not at all: UNIMPLEMENTED, as a node older than `BatchStream`.
        Unknown,
        /// The first two requests answered second first, then each in turn.
        Reversed,
        /// Reads one request and ends the stream without answering it.
        EndsAfterOne,
        /// Reads every request and answers none, keeping the stream open: a hung node.
        Silent,
    }

    /// A node over real gRPC on loopback: answers item `u<n>` with `n` cents, and counts the
    /// unary `Batch` calls and the streams opened.
    #[derive(Clone)]
    struct FakeNode {
        streams: Streams,
        unary_calls: Arc<std::sync::atomic::AtomicUsize>,
        streams_opened: Arc<std::sync::atomic::AtomicUsize>,
        first_request_read: Arc<tokio::sync::Notify>,
    }

    fn answer(request: pb::BatchRequest) -> pb::BatchResponse {
        let results = request
            .items
            .iter()
            .map(|item| pb::BatchResult { amount_cents: item.user[1..].parse().unwrap(), ..Default::default() })
            .collect();
        pb::BatchResponse { results, seq: request.seq }
    }

    type Unary<T> = Result<tonic::Response<T>, Status>;

    #[tonic::async_trait]
    impl redpacket_proto::v1::red_packet_server::RedPacket for FakeNode {
        async fn create_packet(&self, _: tonic::Request<pb::CreatePacketRequest>) -> Unary<pb::CreatePacketResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn grab(&self, _: tonic::Request<pb::GrabRequest>) -> Unary<pb::GrabResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn open(&self, _: tonic::Request<pb::OpenRequest>) -> Unary<pb::OpenResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn grab_and_open(&self, _: tonic::Request<pb::GrabRequest>) -> Unary<pb::OpenResponse> {
            Err(Status::unimplemented("fake"))
        }
        async fn get_packet(&self, _: tonic::Request<pb::GetPacketRequest>) -> Unary<pb::Packet> {
            Err(Status::unimplemented("fake"))
        }
        async fn batch(&self, request: tonic::Request<pb::BatchRequest>) -> Unary<pb::BatchResponse> {
            self.unary_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(tonic::Response::new(answer(request.into_inner())))
        }

        type BatchStreamStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BatchResponse, Status>> + Send>>;

        async fn batch_stream(&self, request: tonic::Request<tonic::Streaming<pb::BatchRequest>>) -> Unary<Self::BatchStreamStream> {
            if let Streams::Unknown = self.streams {
                return Err(Status::unimplemented("unknown method BatchStream"));
            }
            self.streams_opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (streams, read) = (self.streams, self.first_request_read.clone());
            let mut requests = request.into_inner();
            let (answers, outgoing) = mpsc::channel(8);
            tokio::spawn(async move {
                let Ok(Some(first)) = requests.message().await else { return };
                read.notify_one();
                match streams {
                    Streams::EndsAfterOne => return,
                    Streams::Silent => {
                        while let Ok(Some(_)) = requests.message().await {}
                        drop(answers);
                        return;
                    }
                    _ => {}
                }
                let Ok(Some(second)) = requests.message().await else { return };
                let _ = answers.send(Ok(answer(second))).await;
                let _ = answers.send(Ok(answer(first))).await;
                while let Ok(Some(next)) = requests.message().await {
                    let _ = answers.send(Ok(answer(next))).await;
                }
            });
            Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(outgoing))))
        }
    }

    /// Serves `node` on a loopback port and returns a gatherer for it.
    async fn gatherer_for(node: FakeNode) -> Gatherer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(redpacket_proto::v1::red_packet_server::RedPacketServer::new(node))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        Gatherer::new(tonic::service::interceptor::InterceptedService::new(channel, crate::Token(None)))
    }

    fn fake(streams: Streams) -> FakeNode {
        FakeNode { streams, unary_calls: Default::default(), streams_opened: Default::default(), first_request_read: Default::default() }
    }

    fn grab(user: &str) -> pb::BatchItem {
        pb::BatchItem { operation: pb::Operation::GrabAndOpen as i32, packet_id: "p".into(), user: user.into() }
    }

    #[tokio::test]
    async fn a_request_left_unanswered_fails_after_the_request_timeout_and_the_next_call_opens_another_stream() {
        let node = fake(Streams::Silent);
        let gatherer = gatherer_for(node.clone()).await;
        let started = Instant::now();
        let wait = REQUEST_TIMEOUT + std::time::Duration::from_secs(5);
        let answer = tokio::time::timeout(wait, gatherer.call(grab("u1"))).await.expect("freed by the request timeout");
        let status = answer.expect_err("the node never answered");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(crate::is_retryable(&status));
        assert!(started.elapsed() >= REQUEST_TIMEOUT, "failed after {:?}, before the timeout", started.elapsed());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), gatherer.call(grab("u2"))).await;
        assert_eq!(node.streams_opened.load(std::sync::atomic::Ordering::SeqCst), 2, "a new stream for the next call");
    }

    /// Fails instead of hanging when a call is never answered.
    async fn call(gatherer: &Gatherer, item: pb::BatchItem) -> Answer {
        tokio::time::timeout(std::time::Duration::from_secs(5), gatherer.call(item)).await.expect("answered within 5 s")
    }

    fn cents(answer: Answer) -> u64 {
        answer.expect("answered").into_inner().amount_cents
    }

    #[tokio::test]
    async fn answers_on_the_stream_reach_their_callers_whatever_their_order() {
        let node = fake(Streams::Reversed);
        let gatherer = gatherer_for(node.clone()).await;
        let first = tokio::spawn({
            let gatherer = gatherer.clone();
            async move { call(&gatherer, grab("u1")).await }
        });
        // The second call goes out as a request of its own once the node holds the first.
        node.first_request_read.notified().await;
        let second = call(&gatherer, grab("u2")).await;
        assert_eq!(cents(second), 2, "the answer to the second request, which came first");
        assert_eq!(cents(first.await.unwrap()), 1);
        assert_eq!(cents(call(&gatherer, grab("u3")).await), 3, "the stream stays open for the next request");
        assert_eq!(node.streams_opened.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(node.unary_calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_node_without_batch_stream_gets_unary_batches() {
        let node = fake(Streams::Unknown);
        let gatherer = gatherer_for(node.clone()).await;
        assert_eq!(cents(call(&gatherer, grab("u7")).await), 7);
        assert_eq!(cents(call(&gatherer, grab("u8")).await), 8);
        assert_eq!(node.unary_calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_stream_the_node_ends_fails_its_waiting_calls_as_retryable_and_the_next_call_opens_another() {
        let node = fake(Streams::EndsAfterOne);
        let gatherer = gatherer_for(node.clone()).await;
        let status = call(&gatherer, grab("u1")).await.expect_err("the node ended the stream without answering");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(crate::is_retryable(&status));
        let _ = call(&gatherer, grab("u2")).await;
        assert_eq!(node.streams_opened.load(std::sync::atomic::Ordering::SeqCst), 2, "a new stream for the next call");
    }
}
