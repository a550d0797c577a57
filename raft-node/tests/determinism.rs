//! Determinism of the state machine: apply depends only on the log entry and the prior state.
//!
//! The same log applied on two fresh stores, or applied in different batch sizes, must leave
//! byte-for-byte identical state (every key and value of the state-machine column families).

use futures::stream;
use openraft::alias::EntryOf;
use openraft::entry::RaftEntry;
use openraft::storage::RaftStateMachine;
use redpacket_node::packet::Kind;
use redpacket_node::packet::NewPacket;
use redpacket_node::packet::PacketId;
use redpacket_node::packet::Recipients;
use redpacket_node::packet::transfer::Settlement;
use redpacket_node::packet::transfer::fund_id;
use redpacket_node::packet::transfer::pay_id;
use redpacket_node::packet::transfer::refund_id;
use redpacket_node::raft::Command;
use redpacket_node::raft::SettledTransfer;
use redpacket_node::raft::TypeConfig;
use redpacket_node::storage::Store;
use redpacket_node::storage::keys;

const GROUP: u32 = 2;

fn packet(n: u8, shares: u32, total: u64, kind: Kind, recipients: Recipients) -> NewPacket {
    let request_id = format!("req-{n}");
    NewPacket {
        packet_id: PacketId::derive("alice", &request_id, 1_795_392_000_000),
        request_id,
        sender: "alice".into(),
        total,
        shares,
        kind,
        recipients,
        message: "恭喜发财".into(),
        created_at: 1_795_392_000_000,
        expires_at: 1_795_392_000_000 + 60_000,
        seed: [n; 32],
        escrow: "escrow".into(),
    }
}

/// A log mixing every command and every kind of refusal.
fn log() -> Vec<Command> {
    let a = packet(1, 5, 1000, Kind::Lucky, Recipients::Anyone);
    let b = packet(2, 3, 300, Kind::Equal, Recipients::Group(vec!["u1".into(), "u2".into()]));
    let c = packet(3, 1, 77, Kind::Lucky, Recipients::User("solo".into()));
    let at = 1_795_392_001_000;
    let grab = |p: &NewPacket, u: &str, open: bool| Command::Grab { packet_id: p.packet_id.clone(), user: u.into(), at, open };
    let open = |p: &NewPacket, u: &str| Command::Open { packet_id: p.packet_id.clone(), user: u.into(), at };
    let mut log = vec![Command::Create(a.clone()), Command::Create(b.clone()), Command::Create(c.clone())];
    log.push(Command::Create(a.clone())); // a retried create
    log.push(grab(&a, "early", false)); // not funded yet
    let settle = |p: &NewPacket, outcome: Settlement| SettledTransfer { transfer_id: fund_id(&p.packet_id), outcome };
    log.push(Command::Settle(vec![settle(&a, Settlement::Committed), settle(&b, Settlement::Committed)]));
    log.push(Command::Settle(vec![settle(&c, Settlement::Committed)]));
    let unfunded = packet(4, 2, 500, Kind::Lucky, Recipients::Anyone);
    log.push(Command::Create(unfunded.clone()));
    log.push(Command::Settle(vec![settle(&unfunded, Settlement::Aborted { reason: "insufficient funds".into() })]));
    log.push(Command::Settle(vec![settle(&unfunded, Settlement::Committed)])); // a conflicting late settle: ignored
    for u in 0..7 {
        log.push(grab(&a, &format!("user-{u}"), u % 2 == 0)); // 5 win, 2 sold out
    }
    log.push(grab(&a, "user-1", false)); // repeated grab
    log.push(open(&a, "user-1"));
    log.push(open(&a, "user-1")); // repeated open
    log.push(open(&a, "nobody")); // not grabbed
    log.push(grab(&b, "u3", true)); // not a recipient
    log.push(grab(&b, "u1", true));
    log.push(grab(&c, "solo", false));
    log.push(Command::Grab { packet_id: c.packet_id.clone(), user: "late".into(), at: c.expires_at, open: false }); // expired
    log.push(grab(&packet(9, 1, 1, Kind::Lucky, Recipients::Anyone), "x", false)); // unknown packet
    // Expiry: b closes with one share opened (refund of the rest), then nothing more.
    log.push(Command::Expire { packet_ids: vec![b.packet_id.clone(), a.packet_id.clone()], at: b.expires_at });
    log.push(grab(&b, "u2", true)); // closed
    let pays: Vec<SettledTransfer> = (0..5)
        .map(|i| SettledTransfer { transfer_id: format!("pay:{}:{i}", a.packet_id), outcome: Settlement::Committed })
        .collect();
    log.push(Command::Settle(pays));
    log
}

fn entries(log: &[Command]) -> Vec<EntryOf<TypeConfig>> {
    log.iter()
        .enumerate()
        .map(|(i, cmd)| EntryOf::<TypeConfig>::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, i as u64 + 1), cmd.clone()))
        .collect()
}

/// Applies the log in batches of `batch` entries to `store`.
async fn apply_log(store: &Store, batch: usize) {
    let mut sm = store.state_machine(GROUP);
    let all = entries(&log());
    for chunk in all.chunks(batch) {
        let items: Vec<_> = chunk.iter().cloned().map(|e| Ok((e, None))).collect();
        sm.apply(stream::iter(items)).await.unwrap();
    }
}

/// Applies the log in batches of `batch` entries to a fresh store; returns every key and
/// value of the state-machine column families.
async fn apply_all(batch: usize) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1, 4).unwrap();
    apply_log(&store, batch).await;
    let db = store.db();
    let mut dump = Vec::new();
    for cf_name in [keys::CF_SM, keys::CF_SM_META] {
        let cf = db.cf_handle(cf_name).unwrap();
        for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.unwrap();
            dump.push((cf_name.to_string(), k.to_vec(), v.to_vec()));
        }
    }
    dump
}

#[tokio::test]
async fn the_same_log_gives_the_same_bytes_on_two_fresh_stores() {
    let first = apply_all(4).await;
    let second = apply_all(4).await;
    assert!(first.len() > 10, "the log must leave state behind ({} keys)", first.len());
    assert_eq!(first, second);
}

#[tokio::test]
async fn batching_does_not_change_the_result() {
    let one_by_one = apply_all(1).await;
    let all_at_once = apply_all(usize::MAX).await;
    let odd = apply_all(3).await;
    assert_eq!(one_by_one, all_at_once);
    assert_eq!(one_by_one, odd);
}

/// A transfer is listed as unsettled exactly until a `Settle` records its outcome, and the
/// first outcome stands.
#[tokio::test]
async fn transfers_stay_unsettled_until_settled_and_the_first_outcome_stands() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1, 4).unwrap();
    apply_log(&store, 5).await;
    let reader = store.reader(GROUP);
    let (a, b) = (packet(1, 5, 1000, Kind::Lucky, Recipients::Anyone).packet_id, packet(2, 3, 300, Kind::Equal, Recipients::Anyone).packet_id);
    let unfunded = packet(4, 2, 500, Kind::Lucky, Recipients::Anyone).packet_id;

    // Never settled: b's one payment and the two refunds of the expiry.
    let mut unsettled: Vec<String> = reader.unsettled(usize::MAX).unwrap().into_iter().map(|t| t.id).collect();
    unsettled.sort();
    let mut expected = vec![pay_id(&b, 0), refund_id(&a), refund_id(&b)];
    expected.sort();
    assert_eq!(unsettled, expected);
    assert_eq!(reader.unsettled_count(), 3);

    // Every transfer is found by id, settled or not, and listed once by the dump.
    let (_, all) = reader.dump().unwrap();
    for t in &all {
        let found = reader.transfer(&t.id).unwrap().expect("every dumped transfer is found by id");
        assert_eq!(&found, t);
        assert_eq!(t.is_pending(), expected.contains(&t.id), "{}", t.id);
    }
    let mut ids: Vec<&str> = all.iter().map(|t| t.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "a transfer is stored once");

    assert_eq!(reader.transfer(&fund_id(&a)).unwrap().unwrap().settlement, Settlement::Committed);
    assert_eq!(
        reader.transfer(&fund_id(&unfunded)).unwrap().unwrap().settlement,
        Settlement::Aborted { reason: "insufficient funds".into() },
        "the late, conflicting Committed is ignored"
    );
    assert!(reader.transfer("pay:nothing:0").unwrap().is_none());

    // The unsettled set is kept in memory; a reopened store rebuilds it from RocksDB.
    drop(store);
    let store = Store::open(dir.path(), 1, 4).unwrap();
    let mut again: Vec<String> = store.reader(GROUP).unsettled(usize::MAX).unwrap().into_iter().map(|t| t.id).collect();
    again.sort();
    assert_eq!(again, expected);
    assert_eq!(store.reader(GROUP).unsettled(2).unwrap().len(), 2, "the limit holds");
}
