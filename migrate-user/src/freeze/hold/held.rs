//! What a hold kept: IP packets, in arrival order, as they travel to the destination (each
//! prefixed by its length, 4 bytes big-endian), and the report of what it kept and lost.
use serde::{Deserialize, Serialize};

use super::HoldError;

/// The largest packet a hold keeps (a GSO frame from a veth peer reaches 64 KiB).
pub const MAX_PACKET: usize = 1 << 17;
const LEN_BYTES: usize = 4;

/// How much one freeze holds: past either bound, segments are dropped as without a hold (and
/// counted); their senders retransmit them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldBudget {
    /// Bytes of IP packets kept.
    pub bytes: usize,
    /// Packets kept.
    pub packets: usize,
}

impl HoldBudget {
    /// 16 MiB and 65,536 packets: at 50,000 connections each sending every 500 ms, a 500 ms
    /// blackout brings about 50,000 small segments (5 MiB).
    pub const DEFAULT: Self = Self {
        bytes: 16 << 20,
        packets: 65_536,
    };
    /// No hold: every segment dropped during the freeze, as before holds existed.
    pub const NONE: Self = Self {
        bytes: 0,
        packets: 0,
    };

    pub fn is_none(&self) -> bool {
        self.bytes == 0 || self.packets == 0
    }

    /// Bytes of kernel queue the capture gets: the packets plus the kernel's per-packet
    /// accounting (about 1 KiB each for small segments), so that the budget, not the queue,
    /// decides what is dropped.
    pub(super) fn queue_bytes(&self) -> usize {
        self.bytes
            .saturating_add(self.packets.saturating_mul(1 << 10))
            .min(1 << 30)
    }
}

impl Default for HoldBudget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a hold kept and what it could not, for the reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// Packets kept, and their bytes: the peak memory of the hold.
    pub packets: u64,
    pub bytes: u64,
    /// Segments dropped because the budget was spent (`budget`), or the kernel queue was full,
    /// or they were longer than a hold keeps: their senders retransmit them.
    pub over_budget: u64,
    pub queue_full: u64,
    pub too_long: u64,
    pub budget: Option<HoldBudget>,
}

/// The packets a hold kept, encoded for the link.
#[derive(Debug, Default)]
pub struct HeldPackets {
    encoded: Vec<u8>,
    packets: usize,
}

impl HeldPackets {
    /// Appends `packet` if `budget` has room for it; says whether it did.
    pub(super) fn push(&mut self, packet: &[u8], budget: &HoldBudget) -> bool {
        let room =
            self.packets < budget.packets && self.bytes() as usize + packet.len() <= budget.bytes;
        if room {
            let len = u32::try_from(packet.len()).expect("packets are under MAX_PACKET");
            self.encoded.extend_from_slice(&len.to_be_bytes());
            self.encoded.extend_from_slice(packet);
            self.packets += 1;
        }
        room
    }

    pub fn len(&self) -> usize {
        self.packets
    }

    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Bytes of packets, without their length prefixes.
    pub fn bytes(&self) -> u64 {
        (self.encoded.len() - LEN_BYTES * self.packets) as u64
    }

    /// What travels on the link.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The packets of an encoding received from the link, checked whole before any is used.
    pub fn decode(encoded: &[u8]) -> Result<Vec<&[u8]>, HoldError> {
        let mut packets = Vec::new();
        let mut rest = encoded;
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<LEN_BYTES>()
                .ok_or(HoldError::Corrupt {
                    at: encoded.len() - rest.len(),
                })?;
            let len = u32::from_be_bytes(*len) as usize;
            if len > MAX_PACKET || len > tail.len() {
                return Err(HoldError::Corrupt {
                    at: encoded.len() - rest.len(),
                });
            }
            let (packet, tail) = tail.split_at(len);
            packets.push(packet);
            rest = tail;
        }
        Ok(packets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_packets_and_bytes() {
        let budget = HoldBudget {
            bytes: 10,
            packets: 2,
        };
        let mut held = HeldPackets::default();
        assert!(held.push(&[1; 6], &budget));
        assert!(!held.push(&[2; 5], &budget), "11 bytes are over 10");
        assert!(held.push(&[3; 4], &budget));
        assert!(!held.push(&[], &budget), "a third packet is over 2");
        assert_eq!((held.len(), held.bytes()), (2, 10));
        let decoded = HeldPackets::decode(held.encoded()).unwrap();
        assert_eq!(decoded, vec![&[1u8; 6][..], &[3u8; 4][..]]);
    }

    #[test]
    fn a_cut_or_oversized_encoding_is_refused() {
        let mut held = HeldPackets::default();
        held.push(&[7; 8], &HoldBudget::DEFAULT);
        let encoded = held.encoded();
        for cut in 1..encoded.len() {
            assert!(
                HeldPackets::decode(&encoded[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let huge = ((MAX_PACKET + 1) as u32).to_be_bytes();
        assert!(matches!(
            HeldPackets::decode(&huge),
            Err(HoldError::Corrupt { at: 0 })
        ));
        assert!(HeldPackets::decode(&[]).unwrap().is_empty());
    }
}
