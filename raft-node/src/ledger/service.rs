//! The ledger over gRPC (`redpacket.payment.v1.PaymentLedger`), with optional fault
//! injection for tests: calls can fail before doing anything, do their work and then "lose"
//! the reply, or be delayed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use rand::RngExt;
use redpacket_proto::payment as pb;
use redpacket_proto::payment::payment_ledger_server::PaymentLedger;
use redpacket_proto::payment::payment_ledger_server::PaymentLedgerServer;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Account;
use super::Ledger;
use super::LedgerError;
use super::Transfer;
use super::TransferState;

pub struct LedgerService {
    ledger: Arc<Ledger>,
    faults: Mutex<pb::Faults>,
}

fn status(e: LedgerError) -> Status {
    match e {
        LedgerError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        LedgerError::UnknownAccount(_) | LedgerError::NotFound(_) => Status::not_found(e.to_string()),
        LedgerError::InsufficientFunds { .. } | LedgerError::Aborted(_) | LedgerError::Committed(_) => {
            Status::failed_precondition(e.to_string())
        }
        LedgerError::Conflict(_) => Status::already_exists(e.to_string()),
        LedgerError::Overflow(_) => Status::out_of_range(e.to_string()),
        LedgerError::Storage(_) => Status::internal(e.to_string()),
    }
}

/// Each item's outcome as the single call would have answered it.
fn batch_pb(ids: impl Iterator<Item = String>, results: Vec<Result<Transfer, LedgerError>>) -> pb::BatchResponse {
    let outcomes = ids
        .zip(results)
        .map(|(transfer_id, result)| match result {
            Ok(t) => pb::BatchOutcome { transfer_id, code: 0, message: String::new(), transfer: Some(transfer_pb(t)) },
            Err(e) => {
                let s = status(e);
                pb::BatchOutcome { transfer_id, code: s.code() as i32, message: s.message().to_string(), transfer: None }
            }
        })
        .collect();
    pb::BatchResponse { outcomes }
}

fn transfer_pb(t: Transfer) -> pb::Transfer {
    let state = match t.state {
        TransferState::Prepared => pb::TransferState::Prepared,
        TransferState::Committed => pb::TransferState::Committed,
        TransferState::Aborted => pb::TransferState::Aborted,
    };
    pb::Transfer { transfer_id: t.id, from_account: t.from, to_account: t.to, amount_cents: t.amount, state: state as i32 }
}

fn balance_pb(account: &str, a: Account) -> pb::AccountBalance {
    pb::AccountBalance { account: account.to_string(), available_cents: a.available, held_cents: a.held }
}

fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

impl LedgerService {
    pub fn new(ledger: Arc<Ledger>, faults: pb::Faults) -> Self {
        LedgerService { ledger, faults: Mutex::new(faults) }
    }

    /// Runs `op` on a blocking thread (every change is a synced write), under the faults.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let faults = *self.faults.lock().expect("faults lock");
        let (fail_before, fail_after, delay) = {
            let mut rng = rand::rng();
            (
                rng.random_bool(faults.fail_before_ratio.clamp(0.0, 1.0)),
                rng.random_bool(faults.fail_after_ratio.clamp(0.0, 1.0)),
                rng.random_bool(faults.delay_ratio.clamp(0.0, 1.0)),
            )
        };
        if delay {
            tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
        }
        if fail_before {
            return Err(Status::unavailable("injected fault: failed before the call"));
        }
        let ledger = self.ledger.clone();
        let result = tokio::task::spawn_blocking(move || op(&ledger)).await.map_err(|e| Status::internal(e.to_string()))?;
        let value = result.map_err(status)?;
        if fail_after {
            return Err(Status::unavailable("injected fault: the reply was lost"));
        }
        Ok(Response::new(value))
    }
}

#[tonic::async_trait]
impl PaymentLedger for LedgerService {
    async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::Transfer>, Status> {
        let r = request.into_inner();
        self.call(move |l| l.prepare(&r.transfer_id, &r.from_account, &r.to_account, r.amount_cents).map(transfer_pb)).await
    }

    async fn prepare_batch(&self, request: Request<pb::PrepareBatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        let r = request.into_inner();
        self.call(move |l| {
            let items: Vec<_> =
                r.transfers.iter().map(|t| (t.transfer_id.as_str(), t.from_account.as_str(), t.to_account.as_str(), t.amount_cents)).collect();
            let results = l.prepare_many(&items)?;
            Ok(batch_pb(r.transfers.iter().map(|t| t.transfer_id.clone()), results))
        })
        .await
    }

    async fn commit_batch(&self, request: Request<pb::CommitBatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        let ids = request.into_inner().transfer_ids;
        self.call(move |l| {
            let results = l.commit_many(&ids.iter().map(String::as_str).collect::<Vec<_>>())?;
            Ok(batch_pb(ids.iter().cloned(), results))
        })
        .await
    }

    async fn commit(&self, request: Request<pb::TransferIdRequest>) -> Result<Response<pb::Transfer>, Status> {
        let id = request.into_inner().transfer_id;
        self.call(move |l| l.commit(&id).map(transfer_pb)).await
    }

    async fn abort(&self, request: Request<pb::TransferIdRequest>) -> Result<Response<pb::Transfer>, Status> {
        let id = request.into_inner().transfer_id;
        self.call(move |l| l.abort(&id).map(transfer_pb)).await
    }

    async fn get(&self, request: Request<pb::TransferIdRequest>) -> Result<Response<pb::Transfer>, Status> {
        let id = request.into_inner().transfer_id;
        self.call(move |l| l.transfer(&id).map(transfer_pb)).await
    }

    async fn deposit(&self, request: Request<pb::DepositRequest>) -> Result<Response<pb::AccountBalance>, Status> {
        let r = request.into_inner();
        self.call(move |l| l.deposit(&r.deposit_id, &r.account, r.amount_cents).map(|a| balance_pb(&r.account, a))).await
    }

    async fn balance(&self, request: Request<pb::BalanceRequest>) -> Result<Response<pb::AccountBalance>, Status> {
        let account = request.into_inner().account;
        self.call(move |l| l.balance(&account).map(|a| balance_pb(&account, a))).await
    }

    async fn audit(&self, _request: Request<pb::AuditRequest>) -> Result<Response<pb::AuditReport>, Status> {
        let a = tokio::task::spawn_blocking({
            let l = self.ledger.clone();
            move || l.audit()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
        Ok(Response::new(pb::AuditReport {
            accounts: a.accounts,
            available_cents: saturate(a.available),
            held_cents: saturate(a.held),
            deposited_cents: saturate(a.deposited),
            prepared_cents: saturate(a.prepared),
            transfers: a.transfers,
            conserved: a.conserved(),
        }))
    }

    async fn list_transfers(&self, request: Request<pb::ListTransfersRequest>) -> Result<Response<pb::TransferList>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 { 1000 } else { r.limit.min(10_000) } as usize;
        let l = self.ledger.clone();
        let list = tokio::task::spawn_blocking(move || l.list_transfers(&r.prefix, &r.start_after, limit))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(pb::TransferList { transfers: list.into_iter().map(transfer_pb).collect() }))
    }

    async fn set_faults(&self, request: Request<pb::Faults>) -> Result<Response<pb::Faults>, Status> {
        let f = request.into_inner();
        for (name, v) in [("fail_before_ratio", f.fail_before_ratio), ("fail_after_ratio", f.fail_after_ratio), ("delay_ratio", f.delay_ratio)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Status::invalid_argument(format!("{name}: must be between 0 and 1")));
            }
        }
        *self.faults.lock().expect("faults lock") = f;
        tracing::warn!(?f, "fault injection changed");
        Ok(Response::new(f))
    }
}

/// Settings of a `redpacket-payment` process.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub listen_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub faults: pb::Faults,
}

/// Serves the ledger until `shutdown` completes.
pub async fn run(config: LedgerConfig, shutdown: impl std::future::Future<Output = ()> + Send) -> anyhow::Result<()> {
    let ledger = Arc::new(Ledger::open(&config.data_dir)?);
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PaymentLedgerServer<LedgerService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(redpacket_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("redpacket.payment.v1.PaymentLedger")
        .with_service_name("grpc.health.v1.Health")
        .build_v1()?;
    tracing::info!(addr = %config.listen_addr, data_dir = %config.data_dir.display(), "payment ledger serving");
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(PaymentLedgerServer::new(LedgerService::new(ledger, config.faults)).max_decoding_message_size(1 << 20))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await?;
    Ok(())
}

#[derive(clap::Parser)]
#[command(name = "redpacket-payment", version, about = "The payment ledger stub: accounts and two-phase transfers")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen_addr: SocketAddr,
    #[arg(long, default_value = "data/payment")]
    data_dir: PathBuf,
    /// Fail this fraction of calls before doing anything (tests only).
    #[arg(long, default_value_t = 0.0)]
    fail_before_ratio: f64,
    /// Do this fraction of calls, then fail them as if the reply were lost (tests only).
    #[arg(long, default_value_t = 0.0)]
    fail_after_ratio: f64,
    /// Delay this fraction of calls by --delay-ms (tests only).
    #[arg(long, default_value_t = 0.0)]
    delay_ratio: f64,
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

/// Entry point of the `redpacket-payment` binary (also used by the end-to-end tests).
pub fn main() -> anyhow::Result<()> {
    use clap::Parser;
    crate::cli::init_logging();
    let cli = Cli::parse();
    let config = LedgerConfig {
        listen_addr: cli.listen_addr,
        data_dir: cli.data_dir,
        faults: pb::Faults {
            fail_before_ratio: cli.fail_before_ratio,
            fail_after_ratio: cli.fail_after_ratio,
            delay_ratio: cli.delay_ratio,
            delay_ms: cli.delay_ms,
        },
    };
    tokio::runtime::Runtime::new()?.block_on(run(config, crate::node::shutdown_signal()))
}
