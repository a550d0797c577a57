//! The amount algorithm: one draw, and a whole 100-share packet.

use std::hint::black_box;

use criterion::Criterion;
use criterion::criterion_group;
use criterion::criterion_main;
use redpacket_node::packet::Kind;
use redpacket_node::packet::amount::Remaining;
use redpacket_node::packet::amount::all_amounts;
use redpacket_node::packet::amount::draw;

fn amounts(c: &mut Criterion) {
    let seed = [7u8; 32];
    c.bench_function("draw one lucky share", |b| {
        b.iter(|| draw(black_box(&seed), Kind::Lucky, black_box(42), Remaining { cents: 10_000, shares: 58 }))
    });
    c.bench_function("all amounts of a 100-share packet", |b| {
        b.iter(|| all_amounts(black_box(&seed), Kind::Lucky, 20_000, 100))
    });
}

criterion_group!(benches, amounts);
criterion_main!(benches);
