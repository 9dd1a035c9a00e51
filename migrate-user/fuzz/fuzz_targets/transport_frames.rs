//! The frame decoder of the link between `tcpmig migrate` and `tcpmig agent` (what an agent
//! reads from whoever connects) on arbitrary bytes: it must never panic, bytes arriving in
//! arbitrary chunks must give the frames and the error that arriving at once gives, and every
//! frame it accepts must encode to bytes that decode to it.
//!
//! Input: one byte of chunk size, one byte whose low bit selects the limit (the handshake's or
//! the authenticated link's), then the bytes on the wire.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tcpmig::migrate::{Frame, FrameCodec, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use tokio_util::codec::{Decoder as _, Encoder as _};

fuzz_target!(|data: &[u8]| {
    let [chunk, mode, wire @ ..] = data else {
        return;
    };
    let limit = if mode & 1 == 0 {
        MAX_HANDSHAKE_FRAME
    } else {
        MAX_FRAME
    };
    let at_once = decode(wire, wire.len().max(1), limit);
    assert_eq!(decode(wire, usize::from(*chunk).max(1), limit), at_once);
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut again = BytesMut::new();
    for frame in &at_once.0 {
        codec.encode(frame, &mut again).expect("frames encode");
    }
    assert_eq!(
        decode(&again, again.len().max(1), MAX_FRAME),
        (at_once.0, None)
    );
});

/// The frames a link reads from `wire` arriving `chunk` bytes at a time, and the error that
/// ended it, if any (as text: io::Error has no equality).
fn decode(wire: &[u8], chunk: usize, limit: usize) -> (Vec<Frame>, Option<String>) {
    let mut codec = FrameCodec::new(limit);
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    for piece in wire.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => return (frames, Some(error.to_string())),
            }
        }
    }
    // The end of the stream: what is left must not be a partial frame.
    loop {
        match codec.decode_eof(&mut buffer) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(error) => return (frames, Some(error.to_string())),
        }
    }
}
