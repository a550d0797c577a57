//! One state-machine apply on RocksDB: a batch holding one grab of a hot packet, a batch of
//! 64 grabs (what the leader applies when grabs arrive together), and the `many` shape: 32
//! grabs of 32 packets picked at random among 2,000, with the `Settle` entry that records
//! the payments of the batch before (so each transfer is written, then moved, as in a run).

use criterion::BatchSize;
use criterion::Criterion;
use criterion::criterion_group;
use criterion::criterion_main;
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
use redpacket_node::raft::Command;
use redpacket_node::raft::SettledTransfer;
use redpacket_node::raft::TypeConfig;
use redpacket_node::storage::Store;

fn entry(index: u64, command: Command) -> EntryOf<TypeConfig> {
    EntryOf::<TypeConfig>::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, index), command)
}

fn apply(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1, 1).unwrap();
    let mut sm = store.state_machine(0);
    let packet_id = PacketId::derive("alice", "bench", 1_795_392_000_000);
    let create = Command::Create(new_packet(&packet_id, "bench"));
    let funded = Command::Settle(vec![SettledTransfer {
        transfer_id: fund_id(&packet_id),
        outcome: Settlement::Committed,
    }]);
    rt.block_on(sm.apply(stream::iter(vec![Ok((entry(1, create), None)), Ok((entry(2, funded), None))]))).unwrap();
    let mut index = 2u64;
    let mut user = 0u64;
    let mut next = |n: usize| {
        (0..n)
            .map(|_| {
                index += 1;
                user += 1;
                let cmd = Command::Grab { packet_id: packet_id.clone(), user: format!("user-{user}"), at: 1_795_392_000_001, open: true };
                Ok((entry(index, cmd), None))
            })
            .collect::<Vec<_>>()
    };
    c.bench_function("apply 1 grab-and-open", |b| {
        b.iter_batched(|| next(1), |batch| rt.block_on(sm.apply(stream::iter(batch))).unwrap(), BatchSize::SmallInput)
    });
    let mut sm2 = store.state_machine(0);
    c.bench_function("apply 64 grab-and-opens in one batch", |b| {
        b.iter_batched(|| next(64), |batch| rt.block_on(sm2.apply(stream::iter(batch))).unwrap(), BatchSize::SmallInput)
    });
    apply_many(c, &rt);
}

/// 32 grab-and-opens of random packets among 2,000 per batch, plus the settlement of the
/// previous batch's payments: the apply work of the `many` workload, per batch.
fn apply_many(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    const PACKETS: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1, 1).unwrap();
    let mut sm = store.state_machine(0);
    let ids: Vec<PacketId> = (0..PACKETS).map(|n| PacketId::derive("alice", &format!("many-{n}"), 1_795_392_000_000)).collect();
    let mut index = 0u64;
    let mut setup = Vec::new();
    for id in &ids {
        index += 1;
        setup.push(Ok((entry(index, Command::Create(new_packet(id, &id.to_string()))), None)));
    }
    index += 1;
    let funded = ids
        .iter()
        .map(|id| SettledTransfer {
            transfer_id: fund_id(id),
            outcome: Settlement::Committed,
        })
        .collect();
    setup.push(Ok((entry(index, Command::Settle(funded)), None)));
    rt.block_on(sm.apply(stream::iter(setup))).unwrap();

    // A fixed-seed walk over the packets (xorshift), so every run applies the same batches.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut user = 0u64;
    let mut grabs = vec![0u32; PACKETS as usize];
    let mut unsettled: Vec<String> = Vec::new();
    let mut next = || {
        let mut batch = Vec::with_capacity(33);
        if !unsettled.is_empty() {
            index += 1;
            let settled = unsettled
                .drain(..)
                .map(|transfer_id| SettledTransfer { transfer_id, outcome: Settlement::Committed })
                .collect();
            batch.push(Ok((entry(index, Command::Settle(settled)), None)));
        }
        for _ in 0..32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let p = (state % PACKETS) as usize;
            index += 1;
            user += 1;
            unsettled.push(pay_id(&ids[p], grabs[p]));
            grabs[p] += 1;
            let cmd = Command::Grab { packet_id: ids[p].clone(), user: format!("user-{user}"), at: 1_795_392_000_001, open: true };
            batch.push(Ok((entry(index, cmd), None)));
        }
        batch
    };
    c.bench_function("apply many: 32 grab-and-opens of random packets + settle of 32", |b| {
        b.iter_batched(&mut next, |batch| rt.block_on(sm.apply(stream::iter(batch))).unwrap(), BatchSize::SmallInput)
    });
}

fn new_packet(id: &PacketId, request_id: &str) -> NewPacket {
    NewPacket {
        packet_id: id.clone(),
        request_id: request_id.into(),
        sender: "alice".into(),
        total: u64::MAX / 4,
        shares: u32::MAX,
        kind: Kind::Lucky,
        recipients: Recipients::Anyone,
        message: String::new(),
        created_at: 1_795_392_000_000,
        expires_at: u64::MAX,
        seed: [2; 32],
        escrow: "escrow".into(),
    }
}

criterion_group!(benches, apply);
criterion_main!(benches);
