//! Reading records as they arrive: each is checked (length, checksum, fields) before anything
//! of it is used, and a stream that ends before its end record is refused.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};

use super::{
    FIXED_HEAD, FIXED_TAIL, FLAG_IPV6, FLAG_KEEPALIVE, FLAG_NODELAY, FLAG_NONBLOCKING,
    FLAG_REUSEADDR, FLAG_SACK, FLAG_TIMESTAMPS, FLAG_WSCALE, FRAMING, HEADER_LEN, ImageError,
    KIND_CONNECTION, KIND_END, KNOWN_FLAGS, MAGIC, MAX_RECORD, Malformation, OLDEST_VERSION,
    VERSION,
};
use crate::{
    repair::{Connection, Keepalive, Negotiated, RepairWindow, SocketOptions, TcpState},
    tuple::Tuple,
};

/// What one [`Decoder::decode`] call produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Feed more bytes (at least this many) and call again.
    NeedMore(usize),
    Connection(Box<Connection>),
    /// The end record: the image is complete.
    End,
}

/// Decodes an image incrementally: feed bytes into a `BytesMut` as they arrive and call
/// [`decode`](Self::decode) until it returns [`Decoded::End`]; complete records are taken out of
/// the buffer, queue payloads without copying.
///
/// # Examples
/// An image arriving in pieces, as over a transport:
/// ```
/// use bytes::BytesMut;
/// use tcpmig::image::{self, Decoded, Decoder};
///
/// let image = image::encode(&[]);
/// let mut decoder = Decoder::new();
/// let mut buffer = BytesMut::new();
/// let mut connections = Vec::new();
/// 'arrive: for piece in image.chunks(5) {
///     buffer.extend_from_slice(piece);
///     loop {
///         match decoder.decode(&mut buffer)? {
///             Decoded::NeedMore(_) => break,
///             Decoded::Connection(conn) => connections.push(*conn),
///             Decoded::End => break 'arrive,
///         }
///     }
/// }
/// // Refuses a stream cut short, or bytes after the end record.
/// decoder.finish(&buffer)?;
/// assert!(connections.is_empty());
/// # Ok::<(), image::ImageError>(())
/// ```
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

    /// The next record of `src`, or how many more bytes it needs.
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
            check_header(src.split_to(HEADER_LEN))?;
            self.header_done = true;
            self.offset = HEADER_LEN as u64;
        }
        if src.len() < 4 {
            return Ok(Decoded::NeedMore(4 - src.len()));
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if !(FRAMING..=MAX_RECORD).contains(&len) {
            return Err(self.malformed(Malformation::RecordLength(len)));
        }
        if src.len() < len {
            return Ok(Decoded::NeedMore(len - src.len()));
        }
        let decoded = self.record(src.split_to(len).freeze())?;
        if let Decoded::Connection(_) = decoded {
            self.record += 1;
        }
        self.offset += len as u64;
        Ok(decoded)
    }

    /// One complete record, its checksum included.
    fn record(&mut self, mut record: Bytes) -> Result<Decoded, ImageError> {
        let len = record.len();
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
        match record.get_u8() {
            KIND_CONNECTION => Ok(Decoded::Connection(Box::new(self.connection(record)?))),
            KIND_END => {
                let counted = if record.len() == 4 {
                    record.get_u32() as usize
                } else {
                    usize::MAX
                };
                if counted != self.record {
                    return Err(self.malformed(Malformation::EndCount {
                        counted,
                        found: self.record,
                    }));
                }
                self.ended = true;
                Ok(Decoded::End)
            }
            kind => Err(self.malformed(Malformation::UnknownKind(kind))),
        }
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

    fn malformed(&self, what: Malformation) -> ImageError {
        ImageError::Malformed {
            record: self.record,
            offset: self.offset,
            what,
        }
    }

    /// A connection record's body (after the kind, before the checksum).
    fn connection(&self, mut body: Bytes) -> Result<Connection, ImageError> {
        if body.len() < FIXED_HEAD {
            return Err(self.malformed(Malformation::TooShort));
        }
        let flags = body.get_u16();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(self.malformed(Malformation::UnknownFlags(flags)));
        }
        let has = |bit| flags & bit != 0;
        let state = TcpState::from_kernel(body.get_u8());
        let wscales = body.get_u8();
        let addr_len = if has(FLAG_IPV6) { 18 } else { 6 };
        if body.len() < 2 * addr_len + FIXED_TAIL {
            return Err(self.malformed(Malformation::TooShort));
        }
        let tuple = Tuple {
            local: get_addr(&mut body, has(FLAG_IPV6)),
            remote: get_addr(&mut body, has(FLAG_IPV6)),
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
            return Err(self.malformed(Malformation::QueueLengths {
                send: send_len,
                unsent,
                recv: recv_len,
                payload: body.len(),
            }));
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

/// Magic, version and the reserved field.
fn check_header(mut header: BytesMut) -> Result<(), ImageError> {
    if &header[..8] != MAGIC {
        return Err(ImageError::BadMagic);
    }
    header.advance(8);
    let version = header.get_u16();
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(ImageError::Version { found: version });
    }
    let reserved = header.get_u16();
    if reserved != 0 {
        return Err(ImageError::Reserved(reserved));
    }
    Ok(())
}

/// An address and port; the caller checked that the bytes are there.
fn get_addr(body: &mut Bytes, ipv6: bool) -> SocketAddr {
    let ip: IpAddr = if ipv6 {
        let mut octets = [0u8; 16];
        body.copy_to_slice(&mut octets);
        Ipv6Addr::from(octets).into()
    } else {
        let mut octets = [0u8; 4];
        body.copy_to_slice(&mut octets);
        Ipv4Addr::from(octets).into()
    };
    SocketAddr::new(ip, body.get_u16())
}

/// Decodes a complete image held in memory.
///
/// # Examples
/// Read back an image `tcpmig dump --out` wrote:
/// ```no_run
/// use tcpmig::image;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = image::decode(&std::fs::read("connections.img")?)?;
/// for conn in &connections {
///     println!("{} ({} bytes queued)", conn.tuple, conn.send_queue.len() + conn.recv_queue.len());
/// }
/// # Ok(())
/// # }
/// ```
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
