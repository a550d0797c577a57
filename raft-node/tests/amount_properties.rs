//! Properties of the amount algorithm, for random totals, share counts and seeds.

use proptest::prelude::*;
use redpacket_node::packet::Kind;
use redpacket_node::packet::amount::Remaining;
use redpacket_node::packet::amount::after;
use redpacket_node::packet::amount::all_amounts;
use redpacket_node::packet::amount::share_amount;

fn seed_of(n: u64) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    seed
}

/// (shares, total) with total >= shares, up to WeChat-sized and well beyond.
fn packet_shape() -> impl Strategy<Value = (u32, u64)> {
    (1u32..=300).prop_flat_map(|shares| (Just(shares), u64::from(shares)..=2_000_000u64))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_share_gets_a_cent_and_the_sum_is_exact((shares, total) in packet_shape(), seed in any::<[u8; 32]>()) {
        for kind in [Kind::Lucky, Kind::Equal] {
            if kind == Kind::Equal && total % u64::from(shares) != 0 {
                continue;
            }
            let amounts = all_amounts(&seed, kind, total, shares);
            prop_assert_eq!(amounts.len(), shares as usize);
            prop_assert!(amounts.iter().all(|&a| a >= 1));
            prop_assert_eq!(amounts.iter().sum::<u64>(), total);
        }
    }

    #[test]
    fn a_lucky_share_is_at_most_twice_the_remaining_average((shares, total) in packet_shape(), seed in any::<[u8; 32]>()) {
        let amounts = all_amounts(&seed, Kind::Lucky, total, shares);
        let mut remaining = Remaining { cents: total, shares };
        for (k, &amount) in amounts.iter().enumerate() {
            if remaining.shares > 1 {
                // amount <= 2 * cents / shares, in integers: amount * shares <= 2 * cents.
                prop_assert!(
                    u128::from(amount) * u128::from(remaining.shares) <= 2 * u128::from(remaining.cents),
                    "share {} = {} with {:?} left", k, amount, remaining
                );
            }
            remaining = after(remaining, amount);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_amounts((shares, total) in packet_shape(), seed in any::<[u8; 32]>()) {
        let a = all_amounts(&seed, Kind::Lucky, total, shares);
        prop_assert_eq!(&a, &all_amounts(&seed, Kind::Lucky, total, shares));
        let k = shares / 2;
        prop_assert_eq!(a[k as usize], share_amount(&seed, Kind::Lucky, total, shares, k));
    }
}

/// Seed 002: "the actual probability is the same" for every grabber. Across many seeds, the
/// mean amount of each position must equal total / shares, within five standard errors of
/// that position's sample mean (a false alarm has probability below one in a million per
/// position; the seeds are fixed, so the test is also repeatable).
#[test]
fn every_position_has_the_same_expected_amount() {
    const SEEDS: u64 = 20_000;
    for (shares, total) in [(10u32, 10_000u64), (5, 100), (20, 2_000_000)] {
        let mut sum = vec![0f64; shares as usize];
        let mut sum_sq = vec![0f64; shares as usize];
        for s in 0..SEEDS {
            for (k, a) in all_amounts(&seed_of(s), Kind::Lucky, total, shares).into_iter().enumerate() {
                sum[k] += a as f64;
                sum_sq[k] += (a as f64) * (a as f64);
            }
        }
        let expected = total as f64 / f64::from(shares);
        for k in 0..shares as usize {
            let n = SEEDS as f64;
            let mean = sum[k] / n;
            let variance = sum_sq[k] / n - mean * mean;
            let standard_error = (variance / n).sqrt();
            assert!(
                (mean - expected).abs() <= 5.0 * standard_error + 0.5,
                "{shares} shares of {total}: position {k} averages {mean:.2}, expected {expected:.2} ± {:.2}",
                5.0 * standard_error
            );
        }
    }
}
