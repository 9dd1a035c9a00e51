//! The link between `tcpmig migrate` and `tcpmig agent`: TCP, length-delimited frames, a
//! versioned handshake that authenticates the source with a shared token, and a timeout on every
//! step so that a dead peer is noticed within seconds.
//!
//! A frame is one tag byte and a body: [`TAG_MESSAGE`] carries a [`Message`] as JSON,
//! [`TAG_IMAGE`] a piece of the image (see `image`), streamed as the agent decodes it.
use std::{net::SocketAddr, path::Path, time::Duration};

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::{AgentReport, MigrateError};

/// Bumped on any change of [`Message`] or of the framing: both ends must run the same one.
pub const PROTOCOL_VERSION: u16 = 1;
/// The largest frame either side accepts: image pieces are much smaller.
const MAX_FRAME: usize = 8 << 20;
/// The image travels in pieces of this size, so that the agent decodes while it arrives.
pub(super) const IMAGE_PIECE: usize = 256 << 10;
const TAG_MESSAGE: u8 = 0;
const TAG_IMAGE: u8 = 1;

/// What the two sides say to each other, in this order: Hello, Welcome (or Refused), Prepare,
/// Prepared, image pieces, Restored, Commit, Committed. Either side may send Abort or Failed
/// instead of its next step.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Message {
    Hello {
        protocol: u16,
        token: String,
    },
    Welcome {
        protocol: u16,
    },
    Refused {
        reason: String,
    },
    /// Get ready for the connections of `service`, whose address has `prefix_len` on the source.
    Prepare {
        service: SocketAddr,
        prefix_len: u8,
    },
    Prepared,
    /// The image is complete; the agent restored this many connections, in repair mode.
    Restored {
        connections: usize,
        restore_ms: f64,
    },
    /// The source gave up the address: go live.
    Commit,
    Committed {
        report: AgentReport,
    },
    /// The source stops the migration; the agent undoes what it did.
    Abort {
        reason: String,
    },
    /// The agent could not do its step and undid what it did.
    Failed {
        error: String,
    },
}

/// One received frame.
pub(super) enum Frame {
    Message(Message),
    Image(Bytes),
}

/// One end of the link.
pub(super) struct Link {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    peer: SocketAddr,
    timeout: Duration,
}

impl Link {
    pub(super) fn new(stream: TcpStream, peer: SocketAddr, timeout: Duration) -> Self {
        // Small control messages must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec();
        Self {
            framed: Framed::new(stream, codec),
            peer,
            timeout,
        }
    }

    /// Connects to the agent, retrying for a while if it is not listening yet (both commands
    /// are often started together).
    pub(super) async fn connect(to: SocketAddr, timeout: Duration) -> Result<Self, MigrateError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let error = match tokio::time::timeout_at(deadline, TcpStream::connect(to)).await {
                Ok(Ok(stream)) => return Ok(Self::new(stream, to, timeout)),
                Ok(Err(error)) => error,
                Err(_) => std::io::Error::from(std::io::ErrorKind::TimedOut),
            };
            let retry = error.kind() == std::io::ErrorKind::ConnectionRefused
                && tokio::time::Instant::now() + RETRY_PAUSE < deadline;
            if !retry {
                return Err(MigrateError::Connect { to, source: error });
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    pub(super) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(super) async fn send(&mut self, message: &Message) -> Result<(), MigrateError> {
        let mut frame = BytesMut::with_capacity(128);
        frame.put_u8(TAG_MESSAGE);
        serde_json::to_writer((&mut frame).writer(), message).expect("messages always serialize");
        self.send_frame(frame.freeze(), "sending a message").await
    }

    pub(super) async fn send_image(&mut self, piece: &[u8]) -> Result<(), MigrateError> {
        let mut frame = BytesMut::with_capacity(1 + piece.len());
        frame.put_u8(TAG_IMAGE);
        frame.put_slice(piece);
        self.send_frame(frame.freeze(), "sending the image").await
    }

    async fn send_frame(&mut self, frame: Bytes, step: &'static str) -> Result<(), MigrateError> {
        let peer = self.peer;
        match tokio::time::timeout(self.timeout, self.framed.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(MigrateError::Link { peer, step, source }),
            Err(_) => Err(self.timed_out(step)),
        }
    }

    /// The next frame, within the link's timeout (or `longer`, for steps whose work grows with
    /// the number of connections).
    pub(super) async fn recv(
        &mut self,
        step: &'static str,
        longer: Option<Duration>,
    ) -> Result<Frame, MigrateError> {
        let peer = self.peer;
        let wait = longer.unwrap_or(self.timeout).max(self.timeout);
        let mut frame = match tokio::time::timeout(wait, self.framed.next()).await {
            Err(_) => return Err(self.timed_out(step)),
            Ok(None) => return Err(MigrateError::Closed { peer, step }),
            Ok(Some(Err(source))) => return Err(MigrateError::Link { peer, step, source }),
            Ok(Some(Ok(frame))) => frame,
        };
        if frame.is_empty() {
            return Err(self.protocol(step, "an empty frame".to_owned()));
        }
        let tag = frame.split_to(1)[0];
        match tag {
            TAG_MESSAGE => serde_json::from_slice(&frame)
                .map(Frame::Message)
                .map_err(|e| self.protocol(step, format!("an unreadable message ({e})"))),
            TAG_IMAGE => Ok(Frame::Image(frame.freeze())),
            tag => Err(self.protocol(step, format!("a frame with unknown tag {tag}"))),
        }
    }

    /// The next frame, which must be a message; Failed and Abort from the peer become errors.
    pub(super) async fn recv_message(
        &mut self,
        step: &'static str,
        longer: Option<Duration>,
    ) -> Result<Message, MigrateError> {
        match self.recv(step, longer).await? {
            Frame::Message(Message::Failed { error }) => Err(MigrateError::Remote { step, error }),
            Frame::Message(Message::Abort { reason }) => Err(MigrateError::Aborted { reason }),
            Frame::Message(message) => Ok(message),
            Frame::Image(_) => Err(self.protocol(step, "image data".to_owned())),
        }
    }

    pub(super) fn unexpected(&self, step: &'static str, message: &Message) -> MigrateError {
        self.protocol(step, format!("{message:?}"))
    }

    fn protocol(&self, step: &'static str, got: String) -> MigrateError {
        MigrateError::Protocol {
            peer: self.peer,
            step,
            got,
        }
    }

    fn timed_out(&self, step: &'static str) -> MigrateError {
        MigrateError::Timeout {
            peer: self.peer,
            step,
            secs: self.timeout.as_secs_f64(),
        }
    }
}

const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A shared secret, compared in constant time.
#[derive(Clone, Default)]
pub struct Token(String);

impl Token {
    /// Reads the token from `path`: its content without the trailing newline. Should be readable
    /// by root only.
    pub fn from_file(path: &Path) -> Result<Self, MigrateError> {
        let text = std::fs::read_to_string(path).map_err(|source| MigrateError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.is_empty() {
            return Err(MigrateError::TokenFile {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
            });
        }
        Ok(Self(token.to_owned()))
    }

    pub(super) fn as_str(&self) -> &str {
        &self.0
    }

    pub(super) fn matches(&self, offered: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(offered.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}
