//! The Internet checksum (RFC 1071), once for the net plane: the TCP segments tcpmig hands to the
//! local stack (`inject`) and the neighbour advertisements it announces with (`announce`).

/// The ones'-complement sum (RFC 1071) of `bytes` as 16-bit big-endian words, not yet folded;
/// an odd last byte counts as its word's high half.
pub(super) fn sum(bytes: &[u8]) -> u32 {
    let (words, rest) = bytes.as_chunks::<2>();
    let mut total: u32 = words
        .iter()
        .map(|&w| u32::from(u16::from_be_bytes(w)))
        .fold(0, u32::wrapping_add);
    if let [last] = rest {
        total = total.wrapping_add(u32::from(*last) << 8);
    }
    total
}

/// Folds a [`sum`] to 16 bits, carries added back in.
pub(super) fn fold(mut total: u32) -> u16 {
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's example: the sum of 0001 f203 f4f5 f6f7 is ddf2, its complement 220d.
    #[test]
    fn checksum_is_rfc_1071s() {
        let words = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&words)), 0xddf2);
        assert_eq!(!fold(sum(&words)), 0x220d);
    }

    /// An odd length counts its last byte as the high half of a word padded with zero.
    #[test]
    fn an_odd_byte_is_padded() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
        assert_eq!(fold(0x1_fffe), 0xffff);
    }
}
