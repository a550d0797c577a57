//! PostgreSQL with seed 002's optimistic compare-and-set, the first design redpacket is
//! compared with (benches/compare/).
//!
//! A packet is one row holding what is left (`remain_count`, `remain_cents`). A grab reads
//! that row, draws its amount by WeChat's double-average rule in the client, and then, in one
//! transaction, takes the share only if nobody else took one since the read
//! (`UPDATE … WHERE remain_count = $read`) and records the claim. If somebody did, it rolls
//! back and starts again from the read. Every commit is durable: the server runs with
//! `synchronous_commit = on` and `fsync = on`, and nothing here turns them off.
//!
//! The transaction is sent in one of two shapes, whichever is faster at the moment (measured
//! on 2 cores, see benches/compare/README.md): a grab's first try sends the compare-and-set
//! and the claim as one statement (one round trip, committed on its own), which is about a
//! third faster while packets rarely collide; once a try lost the race, the retries use an
//! explicit `BEGIN; UPDATE; INSERT; COMMIT`, whose extra round trips space the losers out and
//! nearly double the throughput of a hot packet.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use anyhow::Context;
use deadpool_postgres::Manager;
use deadpool_postgres::ManagerConfig;
use deadpool_postgres::Pool;
use deadpool_postgres::RecyclingMethod;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::load::Attempt;
use crate::load::Target;

/// Dropped and created again by every `connect`, so that runs do not see each other's rows.
/// `fillfactor` leaves room in each page so that the many updates of a hot packet's row stay
/// heap-only (HOT) and need no index maintenance: what a DBA would do for such a table.
const SCHEMA: &str = "
    DROP TABLE IF EXISTS grabs;
    DROP TABLE IF EXISTS packets;
    CREATE TABLE packets (
        id text PRIMARY KEY,
        total_cents bigint NOT NULL,
        shares int NOT NULL,
        remain_count int NOT NULL,
        remain_cents bigint NOT NULL
    ) WITH (fillfactor = 50);
    CREATE TABLE grabs (
        packet_id text NOT NULL,
        user_id text NOT NULL,
        share_index int NOT NULL,
        amount_cents bigint NOT NULL,
        PRIMARY KEY (packet_id, user_id)
    );
";

const INSERT_PACKET: &str = "INSERT INTO packets (id, total_cents, shares, remain_count, remain_cents) VALUES ($1, $2, $3, $3, $2)";
/// What is left, and the user's share if they already have one (one round trip).
const READ_REMAINING: &str = "
    SELECT p.shares, p.remain_count, p.remain_cents, g.amount_cents
    FROM packets p LEFT JOIN grabs g ON g.packet_id = p.id AND g.user_id = $2
    WHERE p.id = $1";
/// The compare-and-set: succeeds only if no share was taken since `READ_REMAINING`.
const TAKE_SHARE: &str =
    "UPDATE packets SET remain_count = remain_count - 1, remain_cents = remain_cents - $3 WHERE id = $1 AND remain_count = $2";
const RECORD_GRAB: &str = "INSERT INTO grabs (packet_id, user_id, share_index, amount_cents) VALUES ($1, $2, $3, $4)";
/// `TAKE_SHARE` and `RECORD_GRAB` in one statement, hence one implicit transaction.
const TAKE_AND_RECORD: &str = "
    WITH taken AS (
        UPDATE packets SET remain_count = remain_count - 1, remain_cents = remain_cents - $4
        WHERE id = $1 AND remain_count = $3 RETURNING id)
    INSERT INTO grabs (packet_id, user_id, share_index, amount_cents)
    SELECT id, $2, $5, $4 FROM taken";
/// One row per packet: what the claims add up to, next to what the packet says.
const AUDIT: &str = "
    SELECT p.id, p.shares, p.total_cents, p.remain_count, p.remain_cents,
           count(g.user_id), coalesce(sum(g.amount_cents), 0)::bigint
    FROM packets p LEFT JOIN grabs g ON g.packet_id = p.id
    WHERE p.id = ANY($1)
    GROUP BY p.id";

/// The statements every pooled connection prepares once, before the race starts.
const PREPARED: [&str; 5] = [INSERT_PACKET, READ_REMAINING, TAKE_SHARE, RECORD_GRAB, TAKE_AND_RECORD];

/// A pool of `pool` connections shared by all racing clients: a client waits for a free
/// connection rather than opening its own, which is what performs best on a small machine.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    /// Compare-and-sets that lost the race and were retried.
    retries: Arc<AtomicU64>,
}

impl Postgres {
    /// Connects with the libpq-style `conn` string, (re)creates the schema and opens and
    /// warms all `pool` connections, so that neither connecting nor preparing is timed.
    pub async fn connect(conn: &str, pool: usize) -> anyhow::Result<Self> {
        let config: tokio_postgres::Config = conn.parse().with_context(|| format!("PostgreSQL connection string {conn:?}"))?;
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let size = pool.max(1);
        let pool = Pool::builder(manager).max_size(size).build().context("building the PostgreSQL pool")?;
        {
            let client = pool.get().await.context("connecting to PostgreSQL")?;
            client.batch_execute(SCHEMA).await.context("creating the schema")?;
        }
        // Hold every connection at once so the pool really opens `size` of them.
        let mut held = Vec::with_capacity(size);
        for _ in 0..size {
            held.push(pool.get());
        }
        let held = futures::future::try_join_all(held).await.context("opening the pool")?;
        for client in &held {
            for sql in PREPARED {
                client.prepare_cached(sql).await.with_context(|| format!("preparing {sql}"))?;
            }
        }
        drop(held);
        Ok(Self { pool, retries: Arc::new(AtomicU64::new(0)) })
    }

    /// How many compare-and-sets lost the race and were retried, for the report.
    pub fn cas_retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    async fn try_grab(&self, packet: &str, user: &str) -> anyhow::Result<Attempt> {
        let mut client = self.pool.get().await?;
        let read = client.prepare_cached(READ_REMAINING).await?;
        let mut lost = false;
        loop {
            let Some(row) = client.query_opt(&read, &[&packet, &user]).await? else {
                anyhow::bail!("no packet {packet}");
            };
            let (shares, left, cents, mine): (i32, i32, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2), row.get(3));
            if mine.is_some() {
                // A user who already has a share gets that share again, as from redpacket.
                return Ok(Attempt::Won);
            }
            if left == 0 {
                return Ok(Attempt::SoldOut);
            }
            let left_u = u32::try_from(left).context("negative remain_count")?;
            let cents_u = u64::try_from(cents).context("negative remain_cents")?;
            let amount = i64::try_from(draw(cents_u, left_u)?)?;
            let index = shares.checked_sub(left).context("remain_count above shares")?;
            let taken = if lost {
                take_in_transaction(&mut client, packet, user, left, amount, index).await?
            } else {
                take_in_one_statement(&client, packet, user, left, amount, index).await?
            };
            match taken {
                Some(attempt) => return Ok(attempt),
                None => {
                    // Somebody took a share since the read: start again from the read.
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    lost = true;
                }
            }
        }
    }
}

/// The compare-and-set and the claim as one statement. `None` if the race was lost.
async fn take_in_one_statement(
    client: &deadpool_postgres::Client,
    packet: &str,
    user: &str,
    left: i32,
    amount: i64,
    index: i32,
) -> anyhow::Result<Option<Attempt>> {
    let statement = client.prepare_cached(TAKE_AND_RECORD).await?;
    match client.execute(&statement, &[&packet, &user, &left, &amount, &index]).await {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(Attempt::Won)),
        // The same user twice at the same moment: the second claim is refused (never happens
        // in the race, whose users are distinct).
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(Some(Attempt::Failed)),
        Err(e) => Err(e.into()),
    }
}

/// The compare-and-set and the claim in an explicit transaction. `None` if the race was lost.
async fn take_in_transaction(
    client: &mut deadpool_postgres::Client,
    packet: &str,
    user: &str,
    left: i32,
    amount: i64,
    index: i32,
) -> anyhow::Result<Option<Attempt>> {
    let take = client.prepare_cached(TAKE_SHARE).await?;
    let record = client.prepare_cached(RECORD_GRAB).await?;
    let tx = client.transaction().await?;
    if tx.execute(&take, &[&packet, &left, &amount]).await? == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    match tx.execute(&record, &[&packet, &user, &index, &amount]).await {
        Ok(_) => {
            tx.commit().await?;
            Ok(Some(Attempt::Won))
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            tx.rollback().await?;
            Ok(Some(Attempt::Failed))
        }
        Err(e) => Err(e.into()),
    }
}

/// WeChat's double-average rule in integer cents: the last share takes the remainder; any
/// other is uniform in `[1, 2 × cents / left − 1]`, capped so that every share still to come
/// keeps at least one cent.
fn draw(cents: u64, left: u32) -> anyhow::Result<u64> {
    anyhow::ensure!(left >= 1 && cents >= u64::from(left), "{cents} cents cannot fill {left} shares");
    if left == 1 {
        return Ok(cents);
    }
    let double_avg = cents.checked_mul(2).context("cents overflow")? / u64::from(left);
    let hi = double_avg.saturating_sub(1).max(1).min(cents - (u64::from(left) - 1));
    Ok(rand::random_range(1..=hi))
}

impl Target for Postgres {
    async fn create(&self, total_cents: u64, shares: u32) -> anyhow::Result<String> {
        let id = format!("{:032x}", rand::random::<u128>());
        let total = i64::try_from(total_cents).context("total too large")?;
        let shares = i32::try_from(shares).context("too many shares")?;
        let client = self.pool.get().await?;
        let insert = client.prepare_cached(INSERT_PACKET).await?;
        client.execute(&insert, &[&id, &total, &shares]).await?;
        Ok(id)
    }

    async fn grab(&self, packet: &str, user: &str) -> Attempt {
        match self.try_grab(packet, user).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("postgres grab {packet} by {user}: {e:#}");
                Attempt::Failed
            }
        }
    }

    async fn verify(&self, packets: &[String]) -> anyhow::Result<bool> {
        let client = self.pool.get().await?;
        let rows = client.query(AUDIT, &[&packets]).await?;
        let mut ok = rows.len() == packets.len();
        if !ok {
            eprintln!("{} of {} packets found", rows.len(), packets.len());
        }
        for row in rows {
            let (id, shares, total, left, cents, claims, sum): (String, i32, i64, i32, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6));
            if left != 0 || cents != 0 || claims != i64::from(shares) || sum != total {
                eprintln!("packet {id}: {claims} claims of {shares} shares, {sum} of {total} cents, {left} shares and {cents} cents left");
                ok = false;
            }
        }
        eprintln!("postgres: {} compare-and-sets lost the race and were retried", self.cas_retries());
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::draw;

    #[test]
    fn draws_fill_the_packet_exactly() {
        for (total, shares) in [(100u64, 1u32), (1_000, 10), (10, 10), (11, 10), (1_000_000, 10_000)] {
            let (mut cents, mut left, mut sum) = (total, shares, 0);
            while left > 0 {
                let a = draw(cents, left).unwrap();
                assert!(a >= 1 && a <= cents - u64::from(left - 1));
                sum += a;
                cents -= a;
                left -= 1;
            }
            assert_eq!((sum, cents), (total, 0));
        }
    }
}
