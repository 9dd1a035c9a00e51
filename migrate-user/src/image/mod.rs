//! The image: one versioned, checksummed stream for all connections (CRIU writes a file per
//! connection), decodable incrementally as it arrives over a transport.
//!
//! Layout, all integers big-endian:
//! - header: magic `TCPMIGIM`, version u16, reserved u16 (0).
//! - records: length u32 (the whole record, this field and the checksum included), kind u8,
//!   body, CRC-32 u32 of everything before it in the record.
//!   - kind 1, a connection: flags u16, state u8 (the kernel's number; recv_seq is before the
//!     peer's FIN in the states that received it), wscales u8 (send shift low nibble), local
//!     and remote address (4 or 16 bytes each, by flag) and port u16, send_seq, recv_seq, window
//!     (5 x u32), mss u16, timestamp u32, keepalive idle u16, interval u16, count u8,
//!     user_timeout u32, sndbuf u32, rcvbuf u32, mark u32, tos u8, send queue length u32,
//!     unsent u32, receive queue length u32, then the send queue and receive queue bytes.
//!     An idle IPv4 connection takes 93 bytes, an IPv6 one 117.
//!   - kind 2, the end: the number of connection records u32. Without it a stream cut at a
//!     record boundary would look complete.
//!
//! The format is ours, not CRIU's: docs/architecture.md says where images travel in a migration
//! and docs/criu.md why CRIU's one file per connection costs too much.
mod decode;
mod encode;
#[cfg(test)]
mod tests;

use std::{
    fs::OpenOptions,
    io::{self, Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub use self::{
    decode::{Decoded, Decoder, decode},
    encode::{Encoder, Image, encode, records},
};
use crate::repair::Connection;

/// The first bytes of every image.
pub const MAGIC: &[u8; 8] = b"TCPMIGIM";
/// The format version this tcpmig writes. Version 2 added the half-closed states CLOSE_WAIT,
/// LAST_ACK and CLOSING, whose recv_seq stops before the peer's FIN (the restore hands that FIN
/// to the socket again); a version-1 image, which cannot hold them, reads the same.
pub const VERSION: u16 = 2;
/// The oldest format version this tcpmig reads.
pub const OLDEST_VERSION: u16 = 1;
/// Magic, version and reserved field.
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

/// Why an image is refused; each says where (record and byte offset) when it is inside one.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a tcpmig image: bad magic at byte 0 (expected {:?})", std::str::from_utf8(MAGIC).unwrap_or_default())]
    BadMagic,
    #[error(
        "image version {found} is not supported (this tcpmig reads versions {OLDEST_VERSION} to {VERSION}): use the same tcpmig version on both hosts"
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
        what: Malformation,
    },
    #[error("image: {0} bytes after the end record")]
    TrailingData(u64),
    #[error("image file {path}")]
    Io { path: PathBuf, source: io::Error },
}

/// What is wrong inside a record whose checksum holds (a writer bug or a crafted image).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformation {
    #[error("record length {0} out of range")]
    RecordLength(usize),
    #[error("end record counts {counted} connections, the image has {found}")]
    EndCount { counted: usize, found: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("connection record too short")]
    TooShort,
    #[error("unknown flags {0:#06x}")]
    UnknownFlags(u16),
    #[error(
        "queue lengths (send {send}, unsent {unsent}, receive {recv}) do not match the {payload} \
         payload bytes"
    )]
    QueueLengths {
        send: usize,
        unsent: u32,
        recv: usize,
        payload: usize,
    },
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

/// Reads and decodes the image file at `path`.
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
