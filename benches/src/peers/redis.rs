//! Redis with a Lua script, the usual flash-sale design and the second one redpacket is
//! compared with (benches/compare/).
//!
//! A packet is a hash of what is left (`packet:{id}`) and its claims a hash of user → cents
//! (`claims:{id}`; the braces keep both keys in one slot of a Redis Cluster). One script,
//! run atomically by the single-threaded server, refuses a second claim by the same user,
//! answers "sold out", or draws the amount by WeChat's double-average rule, takes the share
//! and records the claim. How durable that is depends on the server: with
//! `appendfsync always` each reply waits for the append-only file to be fsynced (grouped per
//! event-loop turn); without AOF a crash loses everything since the last snapshot.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use redis::AsyncConnectionConfig;
use redis::Script;
use redis::aio::MultiplexedConnection;

use crate::load::Attempt;
use crate::load::Target;

/// KEYS: the packet hash, the claims hash. ARGV: the user, a random integer below 2^53 from
/// the client (scripts must not draw their own: Redis seeds Lua's generator identically for
/// every call). Returns the amount in cents (a user who already has a share gets that share
/// again, as from redpacket), 0 when sold out, -2 when there is no such packet. Lua numbers
/// are doubles: exact for integer cents below 2^53, far above any packet here.
const GRAB: &str = r"
local mine = redis.call('HGET', KEYS[2], ARGV[1])
if mine then return tonumber(mine) end
local r = redis.call('HMGET', KEYS[1], 'remain_count', 'remain_cents')
local left, cents = tonumber(r[1]), tonumber(r[2])
if left == nil or cents == nil then return -2 end
if left == 0 then return 0 end
local amount
if left == 1 then
  amount = cents
else
  local hi = math.floor(2 * cents / left) - 1
  if hi < 1 then hi = 1 end
  if hi > cents - (left - 1) then hi = cents - (left - 1) end
  amount = 1 + (tonumber(ARGV[2]) % hi)
end
local a = string.format('%d', amount)
redis.call('HINCRBY', KEYS[1], 'remain_count', -1)
redis.call('HINCRBY', KEYS[1], 'remain_cents', '-' .. a)
redis.call('HSET', KEYS[2], ARGV[1], a)
return amount
";

/// `pool` multiplexed connections, each pipelining the commands of every client that picks
/// it; clients take them in turn.
#[derive(Clone)]
pub struct Redis {
    connections: Arc<Vec<MultiplexedConnection>>,
    next: Arc<AtomicUsize>,
    grab: Arc<Script>,
}

impl Redis {
    /// Opens `pool` connections to `url` and loads the script once (grabs then use EVALSHA).
    /// Nothing is flushed: every run uses fresh random packet ids.
    pub async fn connect(url: &str, pool: usize) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("Redis URL {url:?}"))?;
        // The default 500 ms response timeout would fail grabs queued behind fsyncs on a
        // slow disk: a late answer is measured, not turned into an error.
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
        let mut connections = Vec::new();
        for _ in 0..pool.max(1) {
            connections.push(client.get_multiplexed_async_connection_with_config(&config).await.context("connecting to Redis")?);
        }
        let grab = Script::new(GRAB);
        grab.prepare_invoke().load_async(&mut connections[0]).await.context("loading the grab script")?;
        Ok(Self { connections: Arc::new(connections), next: Arc::new(AtomicUsize::new(0)), grab: Arc::new(grab) })
    }

    fn connection(&self) -> MultiplexedConnection {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }
}

fn packet_key(id: &str) -> String {
    format!("packet:{{{id}}}")
}

fn claims_key(id: &str) -> String {
    format!("claims:{{{id}}}")
}

impl Target for Redis {
    async fn create(&self, total_cents: u64, shares: u32) -> anyhow::Result<String> {
        let id = format!("{:032x}", rand::random::<u128>());
        let mut con = self.connection();
        let _: () = redis::cmd("HSET")
            .arg(packet_key(&id))
            .arg(&[("remain_count", u64::from(shares)), ("remain_cents", total_cents), ("total", total_cents), ("shares", u64::from(shares))])
            .query_async(&mut con)
            .await?;
        Ok(id)
    }

    async fn grab(&self, packet: &str, user: &str) -> Attempt {
        let mut con = self.connection();
        let result: redis::RedisResult<i64> = self
            .grab
            .key(packet_key(packet))
            .key(claims_key(packet))
            .arg(user)
            .arg(rand::random::<u64>() >> 11)
            .invoke_async(&mut con)
            .await;
        match result {
            Ok(a) if a > 0 => Attempt::Won,
            Ok(0) => Attempt::SoldOut,
            Ok(code) => {
                eprintln!("redis grab {packet} by {user}: refused ({code})");
                Attempt::Failed
            }
            Err(e) => {
                eprintln!("redis grab {packet} by {user}: {e}");
                Attempt::Failed
            }
        }
    }

    async fn verify(&self, packets: &[String]) -> anyhow::Result<bool> {
        let mut con = self.connection();
        let mut ok = true;
        for chunk in packets.chunks(256) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET").arg(packet_key(id)).arg(&["shares", "total", "remain_count", "remain_cents"]);
                pipe.cmd("HVALS").arg(claims_key(id));
            }
            let replies: Vec<redis::Value> = pipe.query_async(&mut con).await?;
            for (id, pair) in chunk.iter().zip(replies.chunks(2)) {
                let fields: Vec<Option<u64>> = redis::from_redis_value_ref(&pair[0])?;
                let amounts: Vec<u64> = redis::from_redis_value_ref(&pair[1])?;
                let [Some(shares), Some(total), Some(left), Some(cents)] = fields[..] else {
                    eprintln!("packet {id}: missing or malformed");
                    ok = false;
                    continue;
                };
                let sum = amounts.iter().try_fold(0u64, |s, a| s.checked_add(*a)).context("claims overflow")?;
                if left != 0 || cents != 0 || amounts.len() as u64 != shares || sum != total {
                    eprintln!("packet {id}: {} claims of {shares} shares, {sum} of {total} cents, {left} shares and {cents} cents left", amounts.len());
                    ok = false;
                }
            }
        }
        Ok(ok)
    }
}
