//! The image: one versioned, checksummed stream for all connections (CRIU writes a file per
//! connection), decodable incrementally as it arrives over a transport.
//!
//! Layout, all integers big-endian:
//! - header: magic `TCPMIGIM`, version u16, reserved u16 (0).
//! - records: length u32 (the whole record, this field and the checksum included), kind u8,
//!   body, CRC-32 u32 of everything before it in the record.
//!   - kind 1, a connection: flags u16, state u8, wscales u8 (send shift low nibble), local
//!     and remote address (4 or 16 bytes each, by flag) and port u16, send_seq, recv_seq, window
//!     (5 x u32), mss u16, timestamp u32, keepalive idle u16, interval u16, count u8,
//!     user_timeout u32, sndbuf u32, rcvbuf u32, mark u32, tos u8, send queue length u32,
//!     unsent u32, receive queue length u32, then the send queue and receive queue bytes.
//!     An idle IPv4 connection takes 93 bytes, an IPv6 one 117.
//!   - kind 2, the end: the number of connection records u32. Without it a stream cut at a
//!     record boundary would look complete.
use std::{
    fs::OpenOptions,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{
    repair::{Connection, Keepalive, Negotiated, RepairWindow, SocketOptions, TcpState},
    tuple::Tuple,
};

pub const MAGIC: &[u8; 8] = b"TCPMIGIM";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;
/// A record claiming more than this is corrupt (queues are bounded by socket buffers).
pub const MAX_RECORD: usize = 256 << 20;

const KIND_CONNECTION: u8 = 1;
const KIND_END: u8 = 2;
const FLAG_IPV6: u16 = 1 << 0;
const FLAG_TIMESTAMPS: u16 = 1 << 1;
const FLAG_SACK: u16 = 1 << 2;
const FLAG_WSCALE: u16 = 1 << 3;
const FLAG_NODELAY: u16 = 1 << 4;
const FLAG_KEEPALIVE: u16 = 1 << 5;
const FLAG_REUSEADDR: u16 = 1 << 6;
const FLAG_NONBLOCKING: u16 = 1 << 7;
const KNOWN_FLAGS: u16 = (1 << 8) - 1;
/// Length, kind and checksum.
const FRAMING: usize = 4 + 1 + 4;
/// The body of a connection record up to its addresses.
const FIXED_HEAD: usize = 2 + 1 + 1;
/// The body of a connection record after its addresses, queues excluded.
const FIXED_TAIL: usize = 4 + 4 + 20 + 2 + 4 + 2 + 2 + 1 + 4 + 4 + 4 + 4 + 1 + 12;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a tcpmig image: bad magic at byte 0 (expected {:?})", std::str::from_utf8(MAGIC).unwrap_or_default())]
    BadMagic,
    #[error(
        "image version {found} is not supported (this tcpmig reads version {VERSION}): use the same tcpmig version on both hosts"
    )]
    Version { found: u16 },
    #[error("image header at byte 8: reserved field is {0}, expected 0")]
    Reserved(u16),
    #[error(
        "image truncated in {what} at byte {offset} (record {record}): {missing} more bytes expected"
    )]
    Truncated {
        what: &'static str,
        record: usize,
        offset: u64,
        missing: usize,
    },
    #[error(
        "image record {record} at byte {offset}: checksum {found:#010x}, expected {expected:#010x}: the image is corrupt"
    )]
    Checksum {
        record: usize,
        offset: u64,
        found: u32,
        expected: u32,
    },
    #[error("image record {record} at byte {offset}: {what}: the image is corrupt")]
    Malformed {
        record: usize,
        offset: u64,
        what: String,
    },
    #[error("image: {0} bytes after the end record")]
    TrailingData(u64),
    #[error("image file {path}")]
    Io { path: PathBuf, source: io::Error },
}

/// What one [`Decoder::decode`] call produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Feed more bytes (at least this many) and call again.
    NeedMore(usize),
    Connection(Box<Connection>),
    /// The end record: the image is complete.
    End,
}

/// Writes the header, connection records and end record into any `BufMut`.
#[derive(Debug, Default)]
pub struct Encoder {
    records: u32,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn header(&self, dst: &mut impl BufMut) {
        dst.put_slice(MAGIC);
        dst.put_u16(VERSION);
        dst.put_u16(0);
    }

    pub fn connection(&mut self, conn: &Connection, dst: &mut impl BufMut) {
        let mut fixed = BytesMut::with_capacity(FRAMING + FIXED_HEAD + 32 + FIXED_TAIL);
        let len = record_len(conn);
        fixed.put_u32(len as u32);
        fixed.put_u8(KIND_CONNECTION);
        put_fixed(conn, &mut fixed);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed);
        crc.update(&conn.send_queue);
        crc.update(&conn.recv_queue);
        dst.put_slice(&fixed);
        dst.put_slice(&conn.send_queue);
        dst.put_slice(&conn.recv_queue);
        dst.put_u32(crc.finalize());
        self.records += 1;
    }

    pub fn end(&self, dst: &mut impl BufMut) {
        let mut record = [0u8; FRAMING + 4];
        let mut body = &mut record[..];
        body.put_u32((FRAMING + 4) as u32);
        body.put_u8(KIND_END);
        body.put_u32(self.records);
        let crc = crc32fast::hash(&record[..FRAMING + 4 - 4]);
        (&mut record[FRAMING..]).put_u32(crc);
        dst.put_slice(&record);
    }
}

/// The whole image of `connections`.
pub fn encode(connections: &[Connection]) -> Bytes {
    let mut encoder = Encoder::new();
    let size = HEADER_LEN + connections.iter().map(record_len).sum::<usize>() + FRAMING + 4;
    let mut out = BytesMut::with_capacity(size);
    encoder.header(&mut out);
    for conn in connections {
        encoder.connection(conn, &mut out);
    }
    encoder.end(&mut out);
    out.freeze()
}

/// Part of an image: the connection records of `connections`, no header or end. Several parts
/// (made where their connections are, the shards of a migration) form one image between
/// [`Image::header`] and [`Image::end`].
pub fn records(connections: &[Connection]) -> Bytes {
    let mut encoder = Encoder::new();
    let mut out = BytesMut::with_capacity(connections.iter().map(record_len).sum());
    for conn in connections {
        encoder.connection(conn, &mut out);
    }
    out.freeze()
}

/// The pieces around [`records`] parts.
pub struct Image;

impl Image {
    pub fn header() -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN);
        Encoder::new().header(&mut out);
        out.freeze()
    }

    /// The end record of an image of `count` connections.
    pub fn end(count: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(FRAMING + 4);
        Encoder {
            records: count as u32,
        }
        .end(&mut out);
        out.freeze()
    }
}

fn record_len(conn: &Connection) -> usize {
    let addr = if conn.tuple.local.is_ipv4() { 6 } else { 18 };
    FRAMING + FIXED_HEAD + 2 * addr + FIXED_TAIL + conn.send_queue.len() + conn.recv_queue.len()
}

fn put_fixed(conn: &Connection, dst: &mut BytesMut) {
    let n = &conn.negotiated;
    let o = &conn.options;
    let flag = |on: bool, bit: u16| if on { bit } else { 0 };
    let flags = flag(!conn.tuple.local.is_ipv4(), FLAG_IPV6)
        | flag(n.timestamps, FLAG_TIMESTAMPS)
        | flag(n.sack, FLAG_SACK)
        | flag(n.wscale.is_some(), FLAG_WSCALE)
        | flag(o.nodelay, FLAG_NODELAY)
        | flag(o.keepalive.is_some(), FLAG_KEEPALIVE)
        | flag(o.reuseaddr, FLAG_REUSEADDR)
        | flag(o.nonblocking, FLAG_NONBLOCKING);
    dst.put_u16(flags);
    dst.put_u8(conn.state.to_kernel());
    let (snd, rcv) = n.wscale.unwrap_or_default();
    dst.put_u8((snd & 0xf) | (rcv << 4));
    for addr in [conn.tuple.local, conn.tuple.remote] {
        match addr.ip() {
            IpAddr::V4(ip) => dst.put_slice(&ip.octets()),
            IpAddr::V6(ip) => dst.put_slice(&ip.octets()),
        }
        dst.put_u16(addr.port());
    }
    dst.put_u32(conn.send_seq);
    dst.put_u32(conn.recv_seq);
    let w = &conn.window;
    for value in [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup] {
        dst.put_u32(value);
    }
    dst.put_u16(n.mss);
    dst.put_u32(conn.timestamp);
    let keepalive = o.keepalive.unwrap_or_default();
    dst.put_u16(keepalive.idle_s);
    dst.put_u16(keepalive.interval_s);
    dst.put_u8(keepalive.count);
    dst.put_u32(o.user_timeout_ms);
    dst.put_u32(o.sndbuf);
    dst.put_u32(o.rcvbuf);
    dst.put_u32(o.mark);
    dst.put_u8(o.tos);
    dst.put_u32(conn.send_queue.len() as u32);
    dst.put_u32(conn.unsent);
    dst.put_u32(conn.recv_queue.len() as u32);
}

/// Decodes an image incrementally: feed bytes into a `BytesMut` as they arrive and call
/// [`decode`](Self::decode) until it returns [`Decoded::End`]; complete records are taken out of
/// the buffer, queue payloads without copying.
#[derive(Debug, Default)]
pub struct Decoder {
    header_done: bool,
    ended: bool,
    record: usize,
    /// Stream offset of the first byte still in the caller's buffer.
    offset: u64,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records decoded so far.
    pub fn records(&self) -> usize {
        self.record
    }

    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Decoded, ImageError> {
        if self.ended {
            return match src.len() {
                0 => Ok(Decoded::End),
                n => Err(ImageError::TrailingData(n as u64)),
            };
        }
        if !self.header_done {
            if src.len() < HEADER_LEN {
                return Ok(Decoded::NeedMore(HEADER_LEN - src.len()));
            }
            let mut header = src.split_to(HEADER_LEN);
            if &header[..8] != MAGIC {
                return Err(ImageError::BadMagic);
            }
            header.advance(8);
            let version = header.get_u16();
            if version != VERSION {
                return Err(ImageError::Version { found: version });
            }
            let reserved = header.get_u16();
            if reserved != 0 {
                return Err(ImageError::Reserved(reserved));
            }
            self.header_done = true;
            self.offset = HEADER_LEN as u64;
        }
        if src.len() < 4 {
            return Ok(Decoded::NeedMore(4 - src.len()));
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if !(FRAMING..=MAX_RECORD).contains(&len) {
            return Err(self.malformed(format!("record length {len} out of range")));
        }
        if src.len() < len {
            return Ok(Decoded::NeedMore(len - src.len()));
        }
        let mut record = src.split_to(len).freeze();
        let expected = u32::from_be_bytes(record[len - 4..].try_into().expect("4 bytes"));
        let found = crc32fast::hash(&record[..len - 4]);
        if found != expected {
            return Err(ImageError::Checksum {
                record: self.record,
                offset: self.offset,
                found,
                expected,
            });
        }
        record.truncate(len - 4);
        record.advance(4);
        let decoded = match record.get_u8() {
            KIND_CONNECTION => Decoded::Connection(Box::new(self.connection(record)?)),
            KIND_END => {
                let count = if record.len() == 4 {
                    record.get_u32() as usize
                } else {
                    usize::MAX
                };
                if count != self.record {
                    return Err(self.malformed(format!(
                        "end record counts {count} connections, the image has {}",
                        self.record
                    )));
                }
                self.ended = true;
                Decoded::End
            }
            kind => return Err(self.malformed(format!("unknown record kind {kind}"))),
        };
        if let Decoded::Connection(_) = decoded {
            self.record += 1;
        }
        self.offset += len as u64;
        Ok(decoded)
    }

    /// Called when the input has ended: an error unless the end record was seen.
    pub fn finish(&self, src: &BytesMut) -> Result<(), ImageError> {
        if self.ended && src.is_empty() {
            return Ok(());
        }
        if self.ended {
            return Err(ImageError::TrailingData(src.len() as u64));
        }
        let (what, needed) = if !self.header_done {
            ("the header", HEADER_LEN)
        } else if src.len() < 4 {
            ("a record length", 4)
        } else {
            (
                "a record",
                u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize,
            )
        };
        Err(ImageError::Truncated {
            what,
            record: self.record,
            offset: self.offset + src.len() as u64,
            missing: needed.saturating_sub(src.len()).max(1),
        })
    }

    fn malformed(&self, what: String) -> ImageError {
        ImageError::Malformed {
            record: self.record,
            offset: self.offset,
            what,
        }
    }

    fn connection(&self, mut body: Bytes) -> Result<Connection, ImageError> {
        if body.len() < FIXED_HEAD {
            return Err(self.malformed("connection record too short".into()));
        }
        let flags = body.get_u16();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(self.malformed(format!("unknown flags {flags:#06x}")));
        }
        let has = |bit| flags & bit != 0;
        let state = TcpState::from_kernel(body.get_u8());
        let wscales = body.get_u8();
        let addr_len = if has(FLAG_IPV6) { 18 } else { 6 };
        if body.len() < 2 * addr_len + FIXED_TAIL {
            return Err(self.malformed("connection record too short".into()));
        }
        let mut addr = || -> SocketAddr {
            let ip: IpAddr = if has(FLAG_IPV6) {
                let mut octets = [0u8; 16];
                body.copy_to_slice(&mut octets);
                Ipv6Addr::from(octets).into()
            } else {
                let mut octets = [0u8; 4];
                body.copy_to_slice(&mut octets);
                Ipv4Addr::from(octets).into()
            };
            SocketAddr::new(ip, body.get_u16())
        };
        let tuple = Tuple {
            local: addr(),
            remote: addr(),
        };
        let send_seq = body.get_u32();
        let recv_seq = body.get_u32();
        let window = RepairWindow {
            snd_wl1: body.get_u32(),
            snd_wnd: body.get_u32(),
            max_window: body.get_u32(),
            rcv_wnd: body.get_u32(),
            rcv_wup: body.get_u32(),
        };
        let mss = body.get_u16();
        let timestamp = body.get_u32();
        let keepalive = Keepalive {
            idle_s: body.get_u16(),
            interval_s: body.get_u16(),
            count: body.get_u8(),
        };
        let options = SocketOptions {
            nodelay: has(FLAG_NODELAY),
            keepalive: has(FLAG_KEEPALIVE).then_some(keepalive),
            user_timeout_ms: body.get_u32(),
            reuseaddr: has(FLAG_REUSEADDR),
            nonblocking: has(FLAG_NONBLOCKING),
            sndbuf: body.get_u32(),
            rcvbuf: body.get_u32(),
            mark: body.get_u32(),
            tos: body.get_u8(),
        };
        let send_len = body.get_u32() as usize;
        let unsent = body.get_u32();
        let recv_len = body.get_u32() as usize;
        if body.len() != send_len.saturating_add(recv_len) || unsent as usize > send_len {
            return Err(self.malformed(format!(
                "queue lengths (send {send_len}, unsent {unsent}, receive {recv_len}) do not \
                 match the {} payload bytes",
                body.len()
            )));
        }
        let send_queue = body.split_to(send_len);
        Ok(Connection {
            tuple,
            state,
            send_seq,
            recv_seq,
            window,
            negotiated: Negotiated {
                timestamps: has(FLAG_TIMESTAMPS),
                sack: has(FLAG_SACK),
                wscale: has(FLAG_WSCALE).then_some((wscales & 0xf, wscales >> 4)),
                mss,
            },
            timestamp,
            options,
            send_queue,
            unsent,
            recv_queue: body,
        })
    }
}

/// Decodes a complete image held in memory.
pub fn decode(image: &[u8]) -> Result<Vec<Connection>, ImageError> {
    let mut src = BytesMut::from(image);
    let mut decoder = Decoder::new();
    let mut connections = Vec::new();
    loop {
        match decoder.decode(&mut src)? {
            Decoded::Connection(conn) => connections.push(*conn),
            Decoded::End => {
                decoder.finish(&src)?;
                return Ok(connections);
            }
            Decoded::NeedMore(_) => {
                decoder.finish(&src)?;
                unreachable!("finish() fails before the end record");
            }
        }
    }
}

/// Writes `image` to `path`, readable by its owner only (it holds the connections' payloads).
pub fn write_file(path: &Path, image: &[u8]) -> Result<(), ImageError> {
    let io_error = |source| ImageError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    // An existing file keeps its mode through open(): narrow it too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_error)?;
    file.write_all(image).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

pub fn read_file(path: &Path) -> Result<Vec<Connection>, ImageError> {
    let mut image = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut file| file.read_to_end(&mut image))
        .map_err(|source| ImageError::Io {
            path: path.to_owned(),
            source,
        })?;
    decode(&image)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        bad[9] = 2;
        let error = decode(&bad).unwrap_err();
        assert!(matches!(error, ImageError::Version { found: 2 }), "{error}");
        assert!(error.to_string().contains("version 2"), "{error}");
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
}
