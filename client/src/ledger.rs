//! A client of the payment ledger (`redpacket-payment`): deposits and balances, for setting
//! up users, demos and tests. Transfers are the nodes' business, not the client's.

use std::time::Duration;

use redpacket_proto::payment as pb;
use redpacket_proto::payment::payment_ledger_client::PaymentLedgerClient;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::Error;

/// An account's money, in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balance {
    pub available_cents: u64,
    pub held_cents: u64,
}

#[derive(Clone)]
pub struct Ledger {
    client: PaymentLedgerClient<Channel>,
}

impl Ledger {
    pub fn connect(endpoint: &str) -> Result<Ledger, Error> {
        let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|_| Error::Endpoint(endpoint.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        Ok(Ledger { client: PaymentLedgerClient::new(channel) })
    }

    /// Adds money to `account` (opening it if needed). Idempotent by `deposit_id`.
    pub async fn deposit(&self, deposit_id: &str, account: &str, amount_cents: u64) -> Result<Balance, Error> {
        let req = pb::DepositRequest { deposit_id: deposit_id.into(), account: account.into(), amount_cents };
        let b = self.client.clone().deposit(req).await.map_err(Error::from_status)?.into_inner();
        Ok(Balance { available_cents: b.available_cents, held_cents: b.held_cents })
    }

    pub async fn balance(&self, account: &str) -> Result<Balance, Error> {
        let b = self
            .client
            .clone()
            .balance(pb::BalanceRequest { account: account.into() })
            .await
            .map_err(Error::from_status)?
            .into_inner();
        Ok(Balance { available_cents: b.available_cents, held_cents: b.held_cents })
    }

    /// The ledger's totals (conservation of money).
    pub async fn audit(&self) -> Result<pb::AuditReport, Error> {
        Ok(self.client.clone().audit(pb::AuditRequest {}).await.map_err(Error::from_status)?.into_inner())
    }

    /// Sets the ledger's fault injection (tests).
    pub async fn set_faults(&self, faults: pb::Faults) -> Result<(), Error> {
        self.client.clone().set_faults(faults).await.map_err(Error::from_status)?;
        Ok(())
    }

    /// A transfer as the ledger records it.
    pub async fn transfer(&self, transfer_id: &str) -> Result<pb::Transfer, Error> {
        Ok(self
            .client
            .clone()
            .get(pb::TransferIdRequest { transfer_id: transfer_id.into() })
            .await
            .map_err(Error::from_status)?
            .into_inner())
    }
}
