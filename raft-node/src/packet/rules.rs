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
        let id = self.id().to_string();
        if self.is_expired(now) {
            return Err(PacketError::Expired(id));
        }
        if !self.terms.recipients.admits(user) {
            return Err(PacketError::NotARecipient { packet_id: id, user: user.to_string() });
        }
        if self.grabbed == self.terms.shares {
            return Err(PacketError::SoldOut(id));
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
        let id = self.id().to_string();
        let Some(claim) = claim else {
            return Err(PacketError::NotGrabbed { packet_id: id, user: user.to_string() });
        };
        if claim.opened_at.is_some() {
            return Ok(OpenOutcome::AlreadyOpen(claim.clone()));
        }
        if self.is_expired(now) {
            return Err(PacketError::Expired(id));
        }
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

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn packet(shares: u32, total: Cents, recipients: Recipients) -> Packet {
        Packet::new(NewPacket {
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
        })
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
}
