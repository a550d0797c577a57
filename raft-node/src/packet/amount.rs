//! How much money each share holds.
//!
//! Nothing is stored per share: the amount of share `k` is a pure function of the packet's
//! seed, total, share count and `k` (the "another realization" of seed 002). Lucky packets
//! follow WeChat's double-average rule: a share is uniform in `[1, 2 × remaining/left − 1]`
//! cents, always leaving at least one cent for each share still to come, and the last
//! share takes the exact remainder. Equal packets split the total evenly.
//!
//! Randomness comes from ChaCha20 (`rand_chacha`), whose output stream is fixed by the
//! algorithm and tested against reference vectors, so every replica and every future build
//! draws the same amounts. Share `k` reads ChaCha stream `k`, so drawing it does not depend
//! on how many numbers earlier shares consumed. The bounded draw below is written out here
//! instead of using `rand`'s `random_range`, whose exact outputs may change between `rand`
//! releases: a replica upgraded mid-flight must not compute a different amount.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Deserialize;
use serde::Serialize;

use super::Cents;
use super::Kind;

/// The 32-byte seed chosen by the group leader when the packet is created.
pub type Seed = [u8; 32];

/// What is left to hand out before a share is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remaining {
    pub cents: Cents,
    pub shares: u32,
}

/// Draws the amount of share `index`, given what remained before it.
///
/// Callers guarantee `remaining.shares >= 1` and `remaining.cents >= remaining.shares`
/// (enforced when the packet is created and preserved by every draw).
pub fn draw(seed: &Seed, kind: Kind, index: u32, remaining: Remaining) -> Cents {
    debug_assert!(remaining.shares >= 1);
    debug_assert!(remaining.cents >= u64::from(remaining.shares));
    if remaining.shares == 1 {
        return remaining.cents;
    }
    match kind {
        Kind::Equal => remaining.cents / u64::from(remaining.shares),
        Kind::Lucky => {
            let left = u128::from(remaining.shares);
            let cents = u128::from(remaining.cents);
            // Twice the remaining average, minus one cent, but never less than one cent...
            let double_avg = (2 * cents / left) as u64;
            let hi = double_avg.saturating_sub(1).max(1);
            // ...and never so much that a later share would get less than one cent.
            let hi = hi.min(remaining.cents - (u64::from(remaining.shares) - 1));
            let mut rng = ChaCha20Rng::from_seed(*seed);
            rng.set_stream(u64::from(index));
            1 + uniform_below(&mut rng, hi)
        }
    }
}

/// The amount of share `index` (0-based) of a packet: a pure function of its inputs.
///
/// This replays the draws of the earlier shares (O(index)); the state machine instead keeps
/// [`Remaining`] with the packet and calls [`draw`] once per grab. Both give the same result.
pub fn share_amount(seed: &Seed, kind: Kind, total: Cents, shares: u32, index: u32) -> Cents {
    assert!(index < shares, "share index {index} out of range for {shares} shares");
    let mut remaining = Remaining { cents: total, shares };
    for k in 0..index {
        let amount = draw(seed, kind, k, remaining);
        remaining = after(remaining, amount);
    }
    draw(seed, kind, index, remaining)
}

/// Every share's amount, in share order.
pub fn all_amounts(seed: &Seed, kind: Kind, total: Cents, shares: u32) -> Vec<Cents> {
    let mut remaining = Remaining { cents: total, shares };
    (0..shares)
        .map(|k| {
            let amount = draw(seed, kind, k, remaining);
            remaining = after(remaining, amount);
            amount
        })
        .collect()
}

/// What remains after a share of `amount` is drawn.
pub fn after(remaining: Remaining, amount: Cents) -> Remaining {
    // A draw never exceeds what remains and leaves a cent per later share; checked anyway,
    // so a broken invariant stops the node instead of wrapping money around.
    Remaining {
        cents: remaining.cents.checked_sub(amount).expect("a share never exceeds what remains"),
        shares: remaining.shares.checked_sub(1).expect("a share is drawn only while shares remain"),
    }
}

/// A uniform integer in `[0, n)` by rejection sampling on 64-bit outputs: unbiased, and
/// defined by this code alone.
fn uniform_below(rng: &mut ChaCha20Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    // The largest multiple of n that fits; outputs at or above it would bias the result.
    let zone = u64::MAX - (u64::MAX % n + 1) % n;
    loop {
        let x = rng.next_u64();
        if x <= zone {
            return x % n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_share_takes_everything() {
        assert_eq!(all_amounts(&[7; 32], Kind::Lucky, 1234, 1), vec![1234]);
    }

    #[test]
    fn equal_shares_are_equal() {
        assert_eq!(all_amounts(&[7; 32], Kind::Equal, 1000, 4), vec![250; 4]);
    }

    #[test]
    fn minimum_money_gives_one_cent_each() {
        assert_eq!(all_amounts(&[1; 32], Kind::Lucky, 5, 5), vec![1; 5]);
    }

    #[test]
    fn share_amount_matches_all_amounts() {
        let seed = [42; 32];
        let all = all_amounts(&seed, Kind::Lucky, 10_000, 10);
        for (k, amount) in all.iter().enumerate() {
            assert_eq!(share_amount(&seed, Kind::Lucky, 10_000, 10, k as u32), *amount);
        }
    }

    /// Pins the output for one seed: if this changes, replicas running different builds
    /// would disagree about money. Never update it without a migration plan.
    #[test]
    fn amounts_are_stable_across_builds() {
        let amounts = all_amounts(&[9; 32], Kind::Lucky, 10_000, 5);
        assert_eq!(amounts.iter().sum::<u64>(), 10_000);
        assert_eq!(amounts, GOLDEN);
    }
    const GOLDEN: [u64; 5] = [3277, 1511, 1169, 2357, 1686];
}
