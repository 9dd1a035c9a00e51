//! The link between `tcpmig migrate` and `tcpmig agent`: TCP, mutual TLS 1.3 (see [`super::tls`];
//! plaintext only with `--insecure`), length-delimited frames, a versioned handshake that may also
//! check a shared token, and a timeout on every step so that a dead peer is noticed within
//! seconds.
//!
//! A frame is one tag byte and a body: [`TAG_MESSAGE`] carries a [`Message`] as JSON,
//! [`TAG_IMAGE`] a piece of the image (see `image`), streamed as the agent decodes it.
//! [`FrameCodec`] is the whole wire format, public so that it can be fuzzed on its own.
use std::{io, net::SocketAddr, time::Duration};

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::{
    codec::{Decoder, Encoder, Framed, LengthDelimitedCodec},
    either::Either,
};

use super::{
    AgentReport, MigrateError, MovedAddress,
    tls::{ClientSecurity, FirstBytes, ServerSecurity, TlsError, classify, rustls_cause},
};

/// Bumped on any change of [`Message`] or of the framing: both ends must run the same one.
/// 2: GoingLive, and Commit says how long the source waits for it.
/// 3: Prepare says how many connections to expect.
/// 4: Prepare may announce a pre-copy, which Precopied answers.
/// 5: the source sends what its freeze held after GoingLive and, the rest, after the agent's
/// Live (Held and their pieces); the agent replays them before Committed.
/// 6: Prepare carries a list of services, each with its count of connections, and of the
/// addresses they move (a dual-stack service in one migration), each with its prefix length.
/// 7: Prepare may keep the addresses on the source (a rebalance); Prepared gives the agent's MAC,
/// where the source forwards what its freeze held (no Held messages any more) and a rebalance
/// steers to.
pub const PROTOCOL_VERSION: u16 = 7;
/// The largest frame either side accepts once the peer is authenticated: image pieces are much
/// smaller.
pub const MAX_FRAME: usize = 8 << 20;
/// The largest frame before the handshake is done: an unauthenticated peer cannot make the agent
/// buffer more than this.
pub const MAX_HANDSHAKE_FRAME: usize = 4 << 10;
/// The image travels in pieces of this size, so that the agent decodes while it arrives.
pub(super) const IMAGE_PIECE: usize = 256 << 10;
const TAG_MESSAGE: u8 = 0;
const TAG_IMAGE: u8 = 1;

/// What the two sides say to each other, in this order: Hello, Welcome (or Refused), Prepare,
/// Prepared, [the pre-copy's image pieces, Precopied,] image pieces, Restored, Commit,
/// GoingLive, Live, Committed. Either side may send Abort or Failed instead of its next step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
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
    /// Get ready for the connections of `services` (address and port each: one per family for
    /// a dual-stack service), whose `addresses` move with them. Each service comes with the
    /// source's count of its connections before it stopped the application: the agent makes
    /// that many sockets ahead, outside the blackout (more may come, or fewer). With `precopy`,
    /// the image of a pre-copy follows Prepared, before the source freezes: the agent restores
    /// it ahead and answers Precopied. With `keep_address` (a rebalance) the addresses stay on
    /// the source: the agent holds them quietly (on `lo`, answering no ARP or ND for them).
    Prepare {
        services: Vec<ExpectedService>,
        addresses: Vec<MovedAddress>,
        precopy: bool,
        keep_address: bool,
    },
    /// Ready, with the MAC of the agent's interface (None if it is not Ethernet): where the
    /// source forwards what its freeze held, and in a rebalance steers the moved connections'
    /// segments. `has_addresses`: in a rebalance, the agent's host has the addresses already
    /// (the connections come back to the host answering for them, which stops forwarding them).
    Prepared {
        mac: Option<[u8; 6]>,
        has_addresses: bool,
    },
    /// The pre-copy's connections restored ahead, in repair mode (0 when the agent could not:
    /// it restores them all after the freeze then).
    Precopied {
        connections: usize,
    },
    /// The image is complete; the agent restored this many connections, in repair mode.
    Restored {
        connections: usize,
        restore_ms: f64,
    },
    /// The source gave up the address: go live. The source rolls back if GoingLive does not
    /// arrive within `answer_within_ms`, so an agent that reads Commit too late refuses it.
    Commit {
        answer_within_ms: u64,
    },
    /// Sent by the agent before it touches anything on Commit: from here on the source must not
    /// roll back, since the connections may go live at the destination.
    GoingLive,
    /// The connections are live at the destination and its address announced: the source stops
    /// holding and forwards what its freeze held to the agent's MAC.
    Live,
    Committed {
        report: Box<AgentReport>,
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

/// A service of a migration, and how many connections the source counted on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedService {
    pub service: SocketAddr,
    pub connections: u32,
}

/// One frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Message(Message),
    Image(Bytes),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed, or a length prefix announced a frame above the limit.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("an empty frame")]
    Empty,
    #[error("an unreadable message ({0})")]
    Unreadable(#[source] serde_json::Error),
    #[error("a frame with unknown tag {0}")]
    UnknownTag(u8),
}

/// The wire format: length-delimited frames (4-byte big-endian length) of a tag and a body.
#[derive(Debug)]
pub struct FrameCodec {
    frames: LengthDelimitedCodec,
}

impl FrameCodec {
    /// Refuses frames longer than `max_frame` bytes before buffering them.
    pub fn new(max_frame: usize) -> Self {
        Self {
            frames: LengthDelimitedCodec::builder()
                .max_frame_length(max_frame)
                .new_codec(),
        }
    }

    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.frames.set_max_frame_length(max_frame);
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(mut frame) = self.frames.decode(src)? else {
            return Ok(None);
        };
        if frame.is_empty() {
            return Err(FrameError::Empty);
        }
        let tag = frame.split_to(1)[0];
        match tag {
            TAG_MESSAGE => serde_json::from_slice(&frame)
                .map(|message| Some(Frame::Message(message)))
                .map_err(FrameError::Unreadable),
            TAG_IMAGE => Ok(Some(Frame::Image(frame.freeze()))),
            tag => Err(FrameError::UnknownTag(tag)),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut body = BytesMut::with_capacity(128);
        match frame {
            Frame::Message(message) => {
                body.put_u8(TAG_MESSAGE);
                serde_json::to_writer((&mut body).writer(), message)
                    .expect("messages always serialize");
            }
            Frame::Image(piece) => {
                body.reserve(1 + piece.len());
                body.put_u8(TAG_IMAGE);
                body.put_slice(piece);
            }
        }
        Ok(self.frames.encode(body.freeze(), dst)?)
    }
}

/// The bytes under the frames: TCP, with TLS on it unless the operator said `--insecure`
/// (left: plaintext).
type LinkStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// What both ends log on each plaintext link.
const PLAINTEXT_WARNING: &str =
    "plaintext link (--insecure): the image and the token travel in clear";

/// One end of the link.
pub(super) struct Link {
    framed: Framed<LinkStream, FrameCodec>,
    peer: SocketAddr,
    timeout: Duration,
}

impl Link {
    /// A link whose peer is not authenticated yet: see [`Link::authenticated`].
    fn new(stream: LinkStream, peer: SocketAddr, timeout: Duration) -> Self {
        Self {
            framed: Framed::new(stream, FrameCodec::new(MAX_HANDSHAKE_FRAME)),
            peer,
            timeout,
        }
    }

    /// The handshake succeeded: image-sized frames are accepted from now on.
    pub(super) fn authenticated(&mut self) {
        self.framed.codec_mut().set_max_frame(MAX_FRAME);
    }

    /// Connects to the agent, retrying for a while if it is not listening yet (both commands
    /// are often started together), and does the TLS handshake (the agent checks our
    /// certificate once it has our first message, see [`Link::tls_refusal`]).
    pub(super) async fn connect(
        to: SocketAddr,
        timeout: Duration,
        security: &ClientSecurity,
    ) -> Result<Self, MigrateError> {
        let tcp = connect_tcp(to, timeout).await?;
        let stream = match security {
            ClientSecurity::Insecure => {
                tracing::warn!(agent = %to, "{PLAINTEXT_WARNING}");
                Either::Left(tcp)
            }
            ClientSecurity::Tls { config, name } => {
                let connecting = TlsConnector::from(config.clone()).connect(name.clone(), tcp);
                let tls = tokio::time::timeout(timeout, connecting)
                    .await
                    .map_err(|_| timed_out(to, "the TLS handshake", timeout))?
                    .map_err(|source| handshake_failed(to, source))?;
                Either::Right(Box::new(tls.into()))
            }
        };
        Ok(Self::new(stream, to, timeout))
    }

    /// Takes a source's connection: what it sends first must match `security` (TLS, or link
    /// frames with `--insecure`); with TLS, its certificate must chain to our CA. `Ok(None)`:
    /// the peer closed or stayed silent without sending a byte (a port probe), so the agent
    /// goes on waiting; an error is a peer that cannot be ours, and ends the agent.
    pub(super) async fn accept(
        tcp: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
        security: &ServerSecurity,
    ) -> Result<Option<Self>, MigrateError> {
        let _ = tcp.set_nodelay(true);
        let mut first = [0u8; 1];
        let first = match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
            Ok(Ok(n)) => classify(&first[..n]),
            Ok(Err(_)) | Err(_) => FirstBytes::Nothing,
        };
        let stream = match (security, first) {
            (_, FirstBytes::Nothing) => return Ok(None),
            (ServerSecurity::Insecure, FirstBytes::Tls) => {
                // Its ClientHello read, our close is an end of stream, not a reset: the source
                // then says the agent closed the handshake.
                let mut hello = [0u8; 4096];
                let _ = tokio::time::timeout(timeout, tcp.readable()).await;
                let _ = tcp.try_read(&mut hello);
                return Err(TlsError::TlsPeer { peer }.into());
            }
            (ServerSecurity::Insecure, FirstBytes::Other) => {
                tracing::warn!(source = %peer, "{PLAINTEXT_WARNING}");
                Either::Left(tcp)
            }
            (ServerSecurity::Tls(_), FirstBytes::Other) => {
                // Told in clear, so that the source says why rather than "corrupt message".
                let mut link = Self::new(Either::Left(tcp), peer, timeout);
                let reason = TlsError::PlaintextPeer { peer };
                let refused = Message::Refused {
                    reason: "this agent speaks TLS only: give tcpmig migrate --tls-cert, \
                             --tls-key and --tls-ca"
                        .to_owned(),
                };
                let _ = link.send(&refused).await;
                return Err(reason.into());
            }
            (ServerSecurity::Tls(config), FirstBytes::Tls) => {
                let accepting = TlsAcceptor::from(config.clone()).accept(tcp);
                let tls = tokio::time::timeout(timeout, accepting)
                    .await
                    .map_err(|_| timed_out(peer, "the TLS handshake", timeout))?
                    .map_err(|source| TlsError::Handshake { peer, source })?;
                Either::Right(Box::new(tls.into()))
            }
        };
        Ok(Some(Self::new(stream, peer, timeout)))
    }

    /// `error` as a TLS failure, when the peer's TLS refused us (an alert, after our first
    /// message: TLS 1.3 checks the client's certificate after the client's handshake is done).
    pub(super) fn tls_refusal(&self, error: MigrateError) -> MigrateError {
        match error {
            MigrateError::Link { peer, source, .. } if rustls_cause(&source).is_some() => {
                TlsError::Handshake { peer, source }.into()
            }
            other => other,
        }
    }

    pub(super) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) async fn send(&mut self, message: &Message) -> Result<(), MigrateError> {
        // Messages are small: the clone is cheaper than a second encoder path.
        self.send_frame(&Frame::Message(message.clone()), "sending a message")
            .await
    }

    pub(super) async fn send_image(&mut self, piece: &[u8]) -> Result<(), MigrateError> {
        let frame = Frame::Image(Bytes::copy_from_slice(piece));
        self.send_frame(&frame, "sending the image").await
    }

    async fn send_frame(&mut self, frame: &Frame, step: &'static str) -> Result<(), MigrateError> {
        match tokio::time::timeout(self.timeout, self.framed.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.frame_error(step, error)),
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
        let wait = longer.unwrap_or(self.timeout).max(self.timeout);
        match tokio::time::timeout(wait, self.framed.next()).await {
            Err(_) => Err(self.timed_out(step)),
            Ok(None) => Err(MigrateError::Closed {
                peer: self.peer,
                step,
            }),
            Ok(Some(Err(error))) => Err(self.frame_error(step, error)),
            Ok(Some(Ok(frame))) => Ok(frame),
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

    fn frame_error(&self, step: &'static str, error: FrameError) -> MigrateError {
        match error {
            FrameError::Io(source) => MigrateError::Link {
                peer: self.peer,
                step,
                source,
            },
            other => self.protocol(step, other.to_string()),
        }
    }

    fn protocol(&self, step: &'static str, got: String) -> MigrateError {
        MigrateError::Protocol {
            peer: self.peer,
            step,
            got,
        }
    }

    fn timed_out(&self, step: &'static str) -> MigrateError {
        timed_out(self.peer, step, self.timeout)
    }
}

fn timed_out(peer: SocketAddr, step: &'static str, timeout: Duration) -> MigrateError {
    MigrateError::Timeout {
        peer,
        step,
        secs: timeout.as_secs_f64(),
    }
}

/// A client handshake that failed; the agent closing the link without a word means it does not
/// speak TLS (see [`Link::accept`]).
fn handshake_failed(peer: SocketAddr, source: io::Error) -> MigrateError {
    if matches!(
        source.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    ) {
        return TlsError::ClosedInHandshake { peer }.into();
    }
    TlsError::Handshake { peer, source }.into()
}

/// Connects, retrying while the agent is not listening yet, until `timeout`.
async fn connect_tcp(to: SocketAddr, timeout: Duration) -> Result<TcpStream, MigrateError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let error = match tokio::time::timeout_at(deadline, TcpStream::connect(to)).await {
            Ok(Ok(stream)) => {
                // Small control messages must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error)) => error,
            Err(_) => io::Error::from(io::ErrorKind::TimedOut),
        };
        let retry = error.kind() == io::ErrorKind::ConnectionRefused
            && tokio::time::Instant::now() + RETRY_PAUSE < deadline;
        if !retry {
            return Err(MigrateError::Connect { to, source: error });
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

const RETRY_PAUSE: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut FrameCodec, bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut buffer = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode_eof(&mut buffer)? {
            frames.push(frame);
        }
        Ok(frames)
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Message(Message::Hello {
                protocol: PROTOCOL_VERSION,
                token: "secret".into(),
            }),
            Frame::Message(Message::Commit {
                answer_within_ms: 10_000,
            }),
            Frame::Image(Bytes::from_static(b"TCPMIGIM")),
            Frame::Message(Message::Committed {
                report: Box::default(),
            }),
        ];
        let mut codec = FrameCodec::new(MAX_FRAME);
        let mut wire = BytesMut::new();
        for frame in &frames {
            codec.encode(frame, &mut wire).unwrap();
        }
        assert_eq!(decode_all(&mut codec, &wire).unwrap(), frames);
    }

    #[test]
    fn an_unauthenticated_peer_cannot_announce_a_big_frame() {
        let mut codec = FrameCodec::new(MAX_HANDSHAKE_FRAME);
        let mut wire = BytesMut::new();
        wire.put_u32(MAX_HANDSHAKE_FRAME as u32 + 1);
        let error = codec.decode(&mut wire).unwrap_err();
        assert!(matches!(error, FrameError::Io(_)), "{error:?}");
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut codec = FrameCodec::new(MAX_FRAME);
        for (wire, want) in [
            (&b"\0\0\0\0"[..], "an empty frame"),
            (b"\0\0\0\x01\x07", "unknown tag 7"),
            (b"\0\0\0\x03\0{}", "unreadable message"),
            (b"\0\0\0\x05\x01ab", "bytes remaining"),
        ] {
            let error = decode_all(&mut codec, wire).unwrap_err().to_string();
            assert!(error.contains(want), "{wire:?}: {error}");
        }
    }
}
