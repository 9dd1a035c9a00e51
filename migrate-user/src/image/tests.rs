use std::os::unix::fs::PermissionsExt as _;

use bytes::{BufMut as _, Bytes, BytesMut};

use super::{encode::record_len, *};
use crate::{
    repair::{Keepalive, Negotiated, RepairWindow, SocketOptions, TcpState},
    tuple::Tuple,
};

fn sample(local: &str, remote: &str, send: &'static [u8], recv: &'static [u8]) -> Connection {
    Connection {
        tuple: Tuple {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        },
        state: TcpState::Established,
        send_seq: 0xdead_beef,
        recv_seq: 7,
        window: RepairWindow {
            snd_wl1: 1,
            snd_wnd: 2,
            max_window: 3,
            rcv_wnd: 4,
            rcv_wup: 5,
        },
        negotiated: Negotiated {
            timestamps: true,
            sack: true,
            wscale: Some((7, 9)),
            mss: 1448,
        },
        timestamp: 123_456,
        options: SocketOptions {
            nodelay: true,
            keepalive: Some(Keepalive {
                idle_s: 60,
                interval_s: 5,
                count: 3,
            }),
            user_timeout_ms: 30_000,
            reuseaddr: true,
            nonblocking: false,
            sndbuf: 87_040,
            rcvbuf: 131_072,
            mark: 0xc114,
            tos: 0x10,
        },
        send_queue: Bytes::from_static(send),
        unsent: send.len().min(2) as u32,
        recv_queue: Bytes::from_static(recv),
    }
}

fn samples() -> Vec<Connection> {
    vec![
        sample("10.0.0.1:80", "10.0.0.2:40000", b"hello", b"world!"),
        sample("[fd00::1]:443", "[fd00::2]:50000", b"", b""),
        sample("127.0.0.1:8080", "127.0.0.1:1234", b"", b"x"),
    ]
}

#[test]
fn round_trip() {
    let conns = samples();
    let image = encode(&conns);
    assert_eq!(decode(&image).unwrap(), conns);
}

#[test]
fn idle_records_are_small() {
    let v4 = sample("10.0.0.1:80", "10.0.0.2:40000", b"", b"");
    let v6 = sample("[fd00::1]:443", "[fd00::2]:50000", b"", b"");
    assert_eq!(record_len(&v4), 93);
    assert_eq!(record_len(&v6), 117);
    assert_eq!(encode(&[v4]).len(), HEADER_LEN + 93 + FRAMING + 4);
}

#[test]
fn streaming_byte_by_byte() {
    let conns = samples();
    let image = encode(&conns);
    let mut decoder = Decoder::new();
    let mut src = BytesMut::new();
    let mut got = Vec::new();
    for &byte in image.iter() {
        src.put_u8(byte);
        loop {
            match decoder.decode(&mut src).unwrap() {
                Decoded::NeedMore(n) => {
                    assert!(n > 0);
                    break;
                }
                Decoded::Connection(conn) => got.push(*conn),
                Decoded::End => break,
            }
        }
    }
    decoder.finish(&src).unwrap();
    assert_eq!(got, conns);
}

#[test]
fn every_truncation_is_refused() {
    let image = encode(&samples());
    for cut in 0..image.len() {
        let error = decode(&image[..cut]).expect_err("a truncated image must be refused");
        assert!(
            matches!(error, ImageError::Truncated { .. }),
            "cut at {cut}: {error}"
        );
    }
}

#[test]
fn every_flipped_byte_is_refused() {
    let image = encode(&samples());
    for at in 0..image.len() {
        let mut corrupt = image.to_vec();
        corrupt[at] ^= 0x20;
        assert!(
            decode(&corrupt).is_err(),
            "flip at byte {at} went unnoticed"
        );
    }
    let mut corrupt = image.to_vec();
    corrupt[HEADER_LEN + 20] ^= 1;
    let error = decode(&corrupt).unwrap_err();
    assert!(
        matches!(
            error,
            ImageError::Checksum {
                record: 0,
                offset: 12,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("record 0 at byte 12"), "{error}");
}

#[test]
fn wrong_magic_and_version() {
    let image = encode(&samples());
    let mut bad = image.to_vec();
    bad[0] = b'X';
    assert!(matches!(decode(&bad), Err(ImageError::BadMagic)));
    let mut bad = image.to_vec();
    bad[9] = 3;
    let error = decode(&bad).unwrap_err();
    assert!(matches!(error, ImageError::Version { found: 3 }), "{error}");
    assert!(error.to_string().contains("version 3"), "{error}");
    // Version 1 holds the same records, without half-closed states: still read.
    let mut old = image.to_vec();
    old[9] = 1;
    assert_eq!(decode(&old).unwrap(), samples());
}

#[test]
fn trailing_bytes_are_refused() {
    let mut image = encode(&samples()).to_vec();
    image.push(0);
    assert!(matches!(decode(&image), Err(ImageError::TrailingData(1))));
}

#[test]
fn files_are_private() {
    let dir = std::env::temp_dir().join(format!("tcpmig-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("image");
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_file(&path, &encode(&samples())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(read_file(&path).unwrap(), samples());
    std::fs::remove_dir_all(&dir).unwrap();
}
