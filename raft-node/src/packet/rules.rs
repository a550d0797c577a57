//! Grabbing and opening shares: the transitions of one packet.
//!
//! Seed 002's two-step design: a grab takes the next share (its index, and an amount fixed
//! now from the seed but not yet shown), an open reveals and records the amount. Both are
//! idempotent: a repeated grab returns the share already held, a repeated open the same
//! amount. The caller passes the user's existing claim, if any, and stores what is returned.

use super::Claim;
use super::Millis;
use super::Packet;
use super::PacketError;
use super::Stage;
use super::amount;

/// Result of a grab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrabOutcome {
    /// A new share was taken: store the packet and this claim.
    Took(Claim),
    /// The user already held this share: nothing changes.
    AlreadyHeld(Claim),
}

impl GrabOutcome {
    pub fn claim(&self) -> &Claim {
        match self {
            GrabOutcome::Took(c) | GrabOutcome::AlreadyHeld(c) => c,
        }
    }
}

/// Result of an open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    /// The share was opened now: store the packet and this claim.
    Opened(Claim),
    /// It was opened before: nothing changes.
    AlreadyOpen(Claim),
}

impl OpenOutcome {
    pub fn claim(&self) -> &Claim {
        match self {
            OpenOutcome::Opened(c) | OpenOutcome::AlreadyOpen(c) => c,
        }
    }
}

impl Packet {
    /// `user` grabs the next share at time `now`. `existing` is the user's claim on this
    /// packet, if there is one.
    pub fn grab(&mut self, user: &str, existing: Option<&Claim>, now: Millis) -> Result<GrabOutcome, PacketError> {
        if let Some(claim) = existing {
            return Ok(GrabOutcome::AlreadyHeld(claim.clone()));
        }
        self.check_open(now)?;
        if !self.terms.recipients.admits(user) {
            return Err(PacketError::NotARecipient { packet_id: self.id().to_string(), user: user.to_string() });
        }
        if self.grabbed == self.terms.shares {
            return Err(PacketError::SoldOut(self.id().to_string()));
        }
        let index = self.grabbed;
        let amount = amount::draw(&self.terms.seed, self.terms.kind, index, self.undrawn);
        self.undrawn = amount::after(self.undrawn, amount);
        self.grabbed += 1;
        Ok(GrabOutcome::Took(Claim {
            user: user.to_string(),
            share_index: index,
            amount,
            grabbed_at: now,
            opened_at: None,
        }))
    }

    /// Opens the share held in `claim` at time `now`.
    pub fn open(&mut self, user: &str, claim: Option<&Claim>, now: Millis) -> Result<OpenOutcome, PacketError> {
        let Some(claim) = claim else {
            return Err(PacketError::NotGrabbed { packet_id: self.id().to_string(), user: user.to_string() });
        };
        if claim.opened_at.is_some() {
            return Ok(OpenOutcome::AlreadyOpen(claim.clone()));
        }
        self.check_open(now)?;
        let opened_cents = self
            .opened_cents
            .checked_add(claim.amount)
            .filter(|&c| c <= self.terms.total)
            .expect("opened amounts never exceed the total: shares are drawn from it");
        self.opened_cents = opened_cents;
        self.opened += 1;
        Ok(OpenOutcome::Opened(Claim { opened_at: Some(now), ..claim.clone() }))
    }
}

impl Packet {
    /// Grabs and opens are accepted only while the packet is funded and not expired. Once
    /// closed it stays closed, whatever time a later entry carries.
    fn check_open(&self, now: Millis) -> Result<(), PacketError> {
        match self.stage {
            Stage::Open if !self.is_expired(now) => Ok(()),
            Stage::Open | Stage::Closed => Err(PacketError::Expired(self.id().to_string())),
            Stage::Funding => Err(PacketError::NotFunded { packet_id: self.id().to_string(), reason: "funding is still in progress".into() }),
            Stage::FundingFailed => Err(PacketError::NotFunded { packet_id: self.id().to_string(), reason: "funding failed".into() }),
        }
    }

    /// What a grab by `user` would answer, decided from the applied state alone, when that
    /// answer can never change: the share the user already holds (opened, for `open`), or a
    /// permanent refusal (sold out, closed, funding failed, not a recipient). `None` when
    /// only the log can decide. This is the leader's fast path (seed 002: "cache resists
    /// invalid requests"); it never answers what a later entry could change.
    pub fn settled_grab_answer(&self, user: &str, existing: Option<&Claim>, open: bool) -> Option<Result<Claim, PacketError>> {
        if let Some(claim) = existing {
            return (!open || claim.opened_at.is_some()).then(|| Ok(claim.clone()));
        }
        match self.stage {
            Stage::Closed => return Some(Err(PacketError::Expired(self.id().to_string()))),
            Stage::FundingFailed => {
                return Some(Err(PacketError::NotFunded { packet_id: self.id().to_string(), reason: "funding failed".into() }));
            }
            Stage::Funding | Stage::Open => {}
        }
        if !self.terms.recipients.admits(user) {
            return Some(Err(PacketError::NotARecipient { packet_id: self.id().to_string(), user: user.to_string() }));
        }
        if self.grabbed == self.terms.shares {
            return Some(Err(PacketError::SoldOut(self.id().to_string())));
        }
        None
    }

    /// Records the outcome of the funding transfer. Only a packet still funding changes.
    pub fn funding_settled(&mut self, committed: bool) {
        if self.stage == Stage::Funding {
            self.stage = if committed { Stage::Open } else { Stage::FundingFailed };
        }
    }

    /// Closes an expired packet at time `now`. Returns the amount to refund to the sender:
    /// everything not opened, including grabbed but unopened shares (as WeChat does).
    /// `None` when the packet cannot close yet (not expired, or funding still pending) or is
    /// already closed.
    pub fn close(&mut self, now: Millis) -> Option<super::Cents> {
        match self.stage {
            Stage::Open if self.is_expired(now) => {
                let refund = self.unopened_cents();
                self.stage = Stage::Closed;
                self.refunded_cents = refund;
                Some(refund)
            }
            Stage::FundingFailed if self.is_expired(now) => {
                self.stage = Stage::Closed;
                Some(0)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn packet(shares: u32, total: Cents, recipients: Recipients) -> Packet {
        let mut p = Packet::new(NewPacket {
            packet_id: PacketId::parse("20261123000000000000000000000001").unwrap(),
            request_id: "r".into(),
            sender: "alice".into(),
            total,
            shares,
            kind: Kind::Lucky,
            recipients,
            message: String::new(),
            created_at: 1_000,
            expires_at: 10_000,
            seed: [3; 32],
            escrow: "escrow".into(),
        });
        p.funding_settled(true);
        p
    }

    #[test]
    fn shares_go_out_in_order_and_add_up() {
        let mut p = packet(3, 300, Recipients::Anyone);
        let claims: Vec<Claim> = ["a", "b", "c"]
            .iter()
            .map(|u| p.grab(u, None, 2_000).unwrap().claim().clone())
            .collect();
        assert_eq!(claims.iter().map(|c| c.share_index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(claims.iter().map(|c| c.amount).sum::<u64>(), 300);
        assert_eq!(p.grab("d", None, 2_000), Err(PacketError::SoldOut(p.id().to_string())));
    }

    #[test]
    fn a_second_grab_returns_the_same_share() {
        let mut p = packet(3, 300, Recipients::Anyone);
        let first = p.grab("a", None, 2_000).unwrap().claim().clone();
        let again = p.grab("a", Some(&first), 2_500).unwrap();
        assert_eq!(again, GrabOutcome::AlreadyHeld(first));
        assert_eq!(p.grabbed, 1);
    }

    #[test]
    fn recipients_and_expiry_are_enforced() {
        let mut p = packet(2, 200, Recipients::Group(vec!["a".into(), "b".into()]));
        assert!(matches!(p.grab("z", None, 2_000), Err(PacketError::NotARecipient { .. })));
        assert!(matches!(p.grab("a", None, 10_000), Err(PacketError::Expired(_))));
        let mut solo = packet(1, 100, Recipients::User("bob".into()));
        assert!(matches!(solo.grab("alice", None, 2_000), Err(PacketError::NotARecipient { .. })));
        assert!(solo.grab("bob", None, 2_000).is_ok());
    }

    #[test]
    fn open_reveals_once_and_needs_a_grab() {
        let mut p = packet(2, 200, Recipients::Anyone);
        assert!(matches!(p.open("a", None, 2_000), Err(PacketError::NotGrabbed { .. })));
        let claim = p.grab("a", None, 2_000).unwrap().claim().clone();
        let opened = p.open("a", Some(&claim), 2_100).unwrap().claim().clone();
        assert_eq!(opened.opened_at, Some(2_100));
        assert_eq!(p.opened_cents, claim.amount);
        let again = p.open("a", Some(&opened), 2_200).unwrap();
        assert_eq!(again, OpenOutcome::AlreadyOpen(opened));
        assert_eq!(p.opened, 1);
    }

    #[test]
    fn best_luck_is_known_only_when_all_are_open_and_ties_go_to_the_earlier_share() {
        let mut p = packet(2, 2, Recipients::Anyone); // two shares of 1 cent: a tie
        let a = p.grab("a", None, 2_000).unwrap().claim().clone();
        let b = p.grab("b", None, 2_000).unwrap().claim().clone();
        let a = p.open("a", Some(&a), 2_000).unwrap().claim().clone();
        assert_eq!(best_luck(&p, &[a.clone(), b.clone()]), None);
        let b = p.open("b", Some(&b), 2_000).unwrap().claim().clone();
        assert_eq!(best_luck(&p, &[b, a]), Some(0));
    }

    #[test]
    fn an_unfunded_packet_cannot_be_grabbed() {
        let mut p = packet(2, 200, Recipients::Anyone);
        p.stage = Stage::Funding;
        assert!(matches!(p.grab("a", None, 2_000), Err(PacketError::NotFunded { .. })));
        p.funding_settled(false);
        assert_eq!(p.stage, Stage::FundingFailed);
        p.funding_settled(true);
        assert_eq!(p.stage, Stage::FundingFailed, "a settled funding never changes");
        assert!(matches!(p.grab("a", None, 2_000), Err(PacketError::NotFunded { .. })));
    }

    #[test]
    fn closing_refunds_everything_unopened_and_stops_grabs_and_opens() {
        let mut p = packet(3, 300, Recipients::Anyone);
        let a = p.grab("a", None, 2_000).unwrap().claim().clone();
        let a = p.open("a", Some(&a), 2_000).unwrap().claim().clone();
        let b = p.grab("b", None, 2_000).unwrap().claim().clone(); // grabbed, never opened
        assert_eq!(p.close(9_999), None, "not expired yet");
        assert_eq!(p.close(10_000), Some(300 - a.amount));
        assert_eq!(p.close(10_000), None, "closes once");
        // Even an entry stamped before the expiry is refused once the packet is closed.
        assert!(matches!(p.open("b", Some(&b), 5_000), Err(PacketError::Expired(_))));
        assert!(matches!(p.grab("c", None, 5_000), Err(PacketError::Expired(_))));
        assert_eq!(p.opened_cents + p.refunded_cents, 300);
    }

    #[test]
    fn the_fast_path_answers_only_what_cannot_change() {
        let mut p = packet(1, 100, Recipients::Group(vec!["a".into(), "b".into()]));
        assert_eq!(p.settled_grab_answer("a", None, false), None, "a share is left: the log decides");
        assert!(matches!(p.settled_grab_answer("z", None, false), Some(Err(PacketError::NotARecipient { .. }))));
        let a = p.grab("a", None, 2_000).unwrap().claim().clone();
        assert_eq!(p.settled_grab_answer("a", Some(&a), false), Some(Ok(a.clone())));
        assert_eq!(p.settled_grab_answer("a", Some(&a), true), None, "opening needs the log");
        assert!(matches!(p.settled_grab_answer("b", None, false), Some(Err(PacketError::SoldOut(_)))));
    }
}
