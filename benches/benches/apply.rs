//! One state-machine apply on RocksDB: a batch holding one grab of a hot packet, and a batch
//! of 64 grabs (what the leader applies when grabs arrive together).

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
    let create = Command::Create(NewPacket {
        packet_id: packet_id.clone(),
        request_id: "bench".into(),
        sender: "alice".into(),
        total: u64::MAX / 2,
        shares: u32::MAX,
        kind: Kind::Lucky,
        recipients: Recipients::Anyone,
        message: String::new(),
        created_at: 1_795_392_000_000,
        expires_at: u64::MAX,
        seed: [1; 32],
        escrow: "escrow".into(),
    });
    let funded = Command::Settle(vec![SettledTransfer {
        transfer_id: redpacket_node::packet::transfer::fund_id(&packet_id),
        outcome: redpacket_node::packet::transfer::Settlement::Committed,
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
}

criterion_group!(benches, apply);
criterion_main!(benches);
