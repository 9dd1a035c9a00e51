//! The bytes a test stream carries: byte `offset` of a direction of a connection is a fixed
//! function of (the client's ip:port, the direction, offset). Both ends compute it from
//! getsockname/getpeername alone, with no header on the wire, and a migrated socket keeps its
//! 4-tuple, so the check holds across a migration.

use std::net::{IpAddr, SocketAddr};

/// Which way the bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

/// Fills `buf` with the stream bytes from `offset` on. A word of the stream is one splitmix64
/// output, so a fill costs one mix per 8 bytes.
pub fn fill(client: SocketAddr, direction: Direction, offset: u64, buf: &mut [u8]) {
    let seed = seed(client, direction);
    let mut offset = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let word = mix(seed ^ (offset / 8)).to_le_bytes();
        let start = (offset % 8) as usize;
        let len = (8 - start).min(rest.len());
        let (head, tail) = rest.split_at_mut(len);
        head.copy_from_slice(&word[start..start + len]);
        rest = tail;
        offset += len as u64;
    }
}

/// Byte `offset` of the stream; [`fill`] is the fast way to get many.
pub fn byte_at(client: SocketAddr, direction: Direction, offset: u64) -> u8 {
    let mut byte = [0];
    fill(client, direction, offset, &mut byte);
    byte[0]
}

fn seed(client: SocketAddr, direction: Direction) -> u64 {
    // A v4 peer seen through a dual-stack v6 socket is the same client.
    let (family, ip) = match client.ip().to_canonical() {
        IpAddr::V4(ip) => (4, u128::from(u32::from(ip))),
        IpAddr::V6(ip) => (6, u128::from(ip)),
    };
    let high = mix(family ^ (ip >> 64) as u64);
    let low = mix(high ^ ip as u64);
    mix(low ^ (u64::from(client.port()) << 1 | direction as u64))
}

/// splitmix64's output function: cheap and well mixed.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::*;

    const CLIENT: &str = "198.18.0.1:40000";

    #[test]
    fn fill_at_any_offset_agrees_with_byte_at() {
        let client = CLIENT.parse().unwrap();
        let mut whole = [0; 100];
        fill(client, ClientToServer, 0, &mut whole);
        for start in 0..20 {
            let mut part = [0; 13];
            fill(client, ClientToServer, start, &mut part);
            assert_eq!(part, whole[start as usize..start as usize + 13]);
        }
        assert!(
            whole
                .iter()
                .enumerate()
                .all(|(i, &b)| b == byte_at(client, ClientToServer, i as u64))
        );
    }

    #[test]
    fn streams_differ_by_direction_port_and_address() {
        let stream = |client: &str, direction| {
            let mut buf = [0; 32];
            fill(client.parse().unwrap(), direction, 0, &mut buf);
            buf
        };
        let base = stream(CLIENT, ClientToServer);
        assert_ne!(base, stream(CLIENT, ServerToClient));
        assert_ne!(base, stream("198.18.0.1:40001", ClientToServer));
        assert_ne!(base, stream("198.18.0.4:40000", ClientToServer));
        assert_ne!(base, stream("[fd54:636d::1]:40000", ClientToServer));
        assert_eq!(base, stream("[::ffff:198.18.0.1]:40000", ClientToServer));
    }
}
