//! The worker's open-loop schedule: when each message is due, and its bytes.

use super::MESSAGE_LEN;

/// Message `k` of the worker goes on connection `k % n` as its message number `k / n`, due `k`
/// n-ths of the interval after the start: each connection sends once per interval, and the
/// connections take turns evenly.
#[derive(Clone, Copy)]
pub(super) struct Schedule {
    pub(super) start: u64,
    pub(super) interval: u64,
    pub(super) connections: u64,
}

impl Schedule {
    /// When message `k` is due. Rounded up, so that it agrees exactly with [`Schedule::due`].
    pub(super) fn at(&self, k: u64) -> u64 {
        let offset = (u128::from(k) * u128::from(self.interval)).div_ceil(self.connections.into());
        self.start + u64::try_from(offset).unwrap_or(u64::MAX)
    }

    /// How many messages are due at `t`.
    pub(super) fn due(&self, t: u64) -> u64 {
        match t.checked_sub(self.start) {
            None => 0,
            Some(elapsed) => {
                let k =
                    u128::from(elapsed) * u128::from(self.connections) / u128::from(self.interval);
                u64::try_from(k).unwrap_or(u64::MAX - 1) + 1
            }
        }
    }

    /// How many messages of connection `i` are due at `t`.
    pub(super) fn due_on(&self, i: usize, t: u64) -> u32 {
        let (k, i) = (self.due(t), i as u64);
        let count = if k > i {
            (k - i).div_ceil(self.connections)
        } else {
            0
        };
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Message `seq` of connection `i` (id `id`), byte for byte.
    pub(super) fn message(&self, i: usize, id: u32, seq: u32) -> [u8; MESSAGE_LEN] {
        let at = self.at(u64::from(seq) * self.connections + i as u64);
        let mut message = [0; MESSAGE_LEN];
        message[..4].copy_from_slice(&id.to_le_bytes());
        message[4..8].copy_from_slice(&seq.to_le_bytes());
        message[8..].copy_from_slice(&at.to_le_bytes());
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_counts_agree_with_send_times() {
        let schedule = Schedule {
            start: 1_000,
            interval: 1_000_000,
            connections: 3,
        };
        for k in 0..100 {
            let at = schedule.at(k);
            assert_eq!(schedule.due(at), k + 1, "message {k} is due at {at}");
            assert_eq!(schedule.due(at - 1), k, "and not before");
        }
        assert_eq!(schedule.due(999), 0);
        // Connection 2's first message is due two thirds of an interval in.
        assert_eq!(schedule.due_on(2, schedule.at(1)), 0);
        assert_eq!(schedule.due_on(2, schedule.at(2)), 1);
        assert_eq!(schedule.due_on(0, schedule.at(3)), 2);
    }

    #[test]
    fn messages_carry_id_sequence_and_schedule() {
        let schedule = Schedule {
            start: 5,
            interval: 30,
            connections: 3,
        };
        let message = schedule.message(1, 0xabcd, 2);
        assert_eq!(message[..4], 0xabcd_u32.to_le_bytes());
        assert_eq!(message[4..8], 2_u32.to_le_bytes());
        assert_eq!(message[8..], (5_u64 + 70).to_le_bytes());
    }
}
