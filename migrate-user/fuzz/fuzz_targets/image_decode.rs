//! The image decoder on arbitrary bytes: it must never panic, the streaming decoder fed in
//! arbitrary chunks must agree with the one-shot decoder, and whatever decodes must re-encode to
//! an image that decodes to the same connections.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tcpmig::image::{self, Decoded, Decoder};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, image_bytes)) = data.split_first() else {
        return;
    };
    let one_shot = image::decode(image_bytes);
    assert_eq!(
        streamed(image_bytes, usize::from(chunk).max(1)).ok(),
        one_shot.as_ref().ok().cloned()
    );
    if let Ok(connections) = one_shot {
        let again = image::decode(&image::encode(&connections)).expect("re-encoded image decodes");
        assert_eq!(again, connections);
    }
});

/// Decodes `bytes` as a transport would deliver them: `chunk` bytes at a time.
fn streamed(
    bytes: &[u8],
    chunk: usize,
) -> Result<Vec<tcpmig::repair::Connection>, image::ImageError> {
    let mut decoder = Decoder::new();
    let mut buffer = BytesMut::new();
    let mut connections = Vec::new();
    let mut pieces = bytes.chunks(chunk);
    'feed: for piece in pieces.by_ref() {
        buffer.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buffer)? {
                Decoded::Connection(connection) => connections.push(*connection),
                Decoded::End => break 'feed,
                Decoded::NeedMore(_) => break,
            }
        }
    }
    // Whatever follows the end record still arrives, and must be refused.
    for piece in pieces {
        buffer.extend_from_slice(piece);
    }
    decoder.finish(&buffer)?;
    Ok(connections)
}
