//! Writing records: the whole image at once, or its parts where their connections are (the
//! shards of a migration), joined between a header and an end record.
use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    FIXED_HEAD, FIXED_TAIL, FLAG_IPV6, FLAG_KEEPALIVE, FLAG_NODELAY, FLAG_NONBLOCKING,
    FLAG_REUSEADDR, FLAG_SACK, FLAG_TIMESTAMPS, FLAG_WSCALE, FRAMING, HEADER_LEN, KIND_CONNECTION,
    KIND_END, MAGIC, VERSION,
};
use crate::repair::Connection;

/// Writes the header, connection records and end record into any `BufMut`.
#[derive(Debug, Default)]
pub struct Encoder {
    records: u32,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The header, first in every image.
    pub fn header(&self, dst: &mut impl BufMut) {
        dst.put_slice(MAGIC);
        dst.put_u16(VERSION);
        dst.put_u16(0);
    }

    /// One connection record; the end record counts it.
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

    /// The end record, counting the connections written: a stream without it is incomplete.
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
///
/// # Examples
/// ```
/// use tcpmig::image;
///
/// let image = image::encode(&[]);
/// assert!(image.starts_with(image::MAGIC));
/// assert!(image::decode(&image)?.is_empty());
/// # Ok::<(), image::ImageError>(())
/// ```
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
    /// The header, before the first part.
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

/// The bytes `conn`'s record takes, framing and queues included.
pub(super) fn record_len(conn: &Connection) -> usize {
    let addr = if conn.tuple.local.is_ipv4() { 6 } else { 18 };
    FRAMING + FIXED_HEAD + 2 * addr + FIXED_TAIL + conn.send_queue.len() + conn.recv_queue.len()
}

/// A connection record's body up to its queues.
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
