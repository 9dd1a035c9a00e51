//! The command line of `tcpmig-peer` ([`PeerMode`]): the roles and stream offsets of its byte
//! streams ([`PeerArgs`]) and the arguments that give them back, or one of the open-loop load's
//! processes.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser};

use super::PeerCommand;

use crate::echo::EchoArgs;
use crate::load::WorkerArgs;
use crate::probe::ProbeArgs;

const DEFAULT_BYTES: u64 = 1024;
const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// The command line of `tcpmig-peer`, the bed's one traffic program: byte-exact streams
/// ([`PeerArgs`]), or a process of the open-loop load ([`crate::load`], [`crate::echo`]).
#[derive(Parser, Debug)]
#[command(
    name = "tcpmig-peer",
    about = "Verifiable TCP traffic for tcpmig's test bed"
)]
pub enum PeerMode {
    #[command(flatten)]
    Streams(PeerArgs),
    /// One process of the open-loop load generator: connections sending on a fixed schedule.
    LoadWorker(WorkerArgs),
    /// A server echoing every byte back, for the open-loop load.
    EchoServer(EchoArgs),
    /// New connections to a service, one every few milliseconds, each checked by one echo.
    Probe(ProbeArgs),
}

/// The byte-stream roles of `tcpmig-peer` (see the module docs of [`crate::peer`]).
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "tcpmig-peer",
    about = "Verifiable TCP traffic for tcpmig's test bed"
)]
pub enum PeerArgs {
    /// Accept (or adopt) connections and serve a stream on each.
    Server(ServerArgs),
    /// Open connections and send a stream on each.
    Client(ClientArgs),
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
#[group(id = "connections", required = true, multiple = false, args = ["listen", "from_listen_fds"])]
pub struct ServerArgs {
    /// Listen here and accept `--expect` connections.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Take the connected sockets passed as fds 3.. (LISTEN_FDS, LISTEN_PID).
    #[arg(long)]
    pub from_listen_fds: bool,
    /// How many connections to accept.
    #[arg(long, default_value_t = 1, conflicts_with = "from_listen_fds")]
    pub expect: usize,
    /// Share the port (SO_REUSEPORT) as the K-th listener of its group, and steer new
    /// connections to this one (see the module docs).
    #[arg(long, value_name = "K", conflicts_with = "from_listen_fds")]
    pub reuseport: Option<usize>,
    /// Mirror the clients' streams instead of taking commands (see the module docs).
    #[arg(long, conflicts_with = "from_listen_fds")]
    pub mirror: bool,
    /// Run this command instead of reading stdin (repeatable, in order), then print one
    /// `ScriptReport` line and exit.
    #[arg(long = "script", value_name = "CMD", conflicts_with = "listen")]
    pub script: Vec<PeerCommand>,
    #[command(flatten)]
    pub stream: StreamArgs,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ClientArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    /// How many connections to open.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// The stream offsets and deadlines, the same for both roles (see the module docs).
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamArgs {
    /// Length of both streams of every connection at first.
    #[arg(long, default_value_t = DEFAULT_BYTES)]
    pub bytes: u64,
    /// Bytes of the outgoing stream a previous owner of the sockets already wrote.
    #[arg(long, default_value_t = 0)]
    pub sent_already: u64,
    /// Bytes of the incoming stream a previous owner of the sockets already read.
    #[arg(long, default_value_t = 0)]
    pub received_already: u64,
    /// Bound on each phase: connecting or accepting all, and each command.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,
}

impl StreamArgs {
    /// Streams of `bytes` bytes, nothing sent or received before, the default deadline.
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            sent_already: 0,
            received_already: 0,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

impl PeerArgs {
    pub fn server(listen: SocketAddr, expect: usize, stream: StreamArgs) -> Self {
        Self::Server(ServerArgs {
            listen: Some(listen),
            expect,
            ..ServerArgs::new(stream)
        })
    }

    /// A `--reuseport` server: the `index`-th of the processes sharing `listen`.
    pub fn shared_server(
        listen: SocketAddr,
        index: usize,
        expect: usize,
        stream: StreamArgs,
    ) -> Self {
        Self::Server(ServerArgs {
            listen: Some(listen),
            expect,
            reuseport: Some(index),
            ..ServerArgs::new(stream)
        })
    }

    /// A `--mirror` server: the clients' streams come back, byte for byte in length.
    pub fn mirror_server(listen: SocketAddr, expect: usize, stream: StreamArgs) -> Self {
        Self::Server(ServerArgs {
            listen: Some(listen),
            expect,
            mirror: true,
            ..ServerArgs::new(stream)
        })
    }

    /// A server that takes over connected sockets passed as fds (see
    /// [`Namespace::command_with_listen_fds`](crate::Namespace::command_with_listen_fds)).
    pub fn adopting_server(stream: StreamArgs) -> Self {
        Self::scripted_adopting_server(stream, Vec::new())
    }

    /// An adopting server that runs `script` instead of reading commands (none: it reads them).
    pub fn scripted_adopting_server(stream: StreamArgs, script: Vec<PeerCommand>) -> Self {
        Self::Server(ServerArgs {
            from_listen_fds: true,
            script,
            ..ServerArgs::new(stream)
        })
    }

    pub fn client(connect: SocketAddr, count: usize, stream: StreamArgs) -> Self {
        Self::Client(ClientArgs {
            connect,
            count,
            stream,
        })
    }

    pub fn stream(&self) -> &StreamArgs {
        match self {
            Self::Server(server) => &server.stream,
            Self::Client(client) => &client.stream,
        }
    }

    /// The arguments that make `tcpmig-peer` parse back to `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = match self {
            Self::Server(ServerArgs {
                listen: Some(addr),
                expect,
                reuseport,
                mirror,
                ..
            }) => {
                let mut args = vec![
                    "server".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--expect".into(),
                    expect.to_string(),
                ];
                if let Some(index) = reuseport {
                    args.extend(["--reuseport".into(), index.to_string()]);
                }
                if *mirror {
                    args.push("--mirror".into());
                }
                args
            }
            Self::Server(ServerArgs {
                listen: None,
                script,
                ..
            }) => {
                let mut args = vec!["server".into(), "--from-listen-fds".into()];
                for command in script {
                    args.extend(["--script".into(), command.to_string()]);
                }
                args
            }
            Self::Client(ClientArgs { connect, count, .. }) => {
                vec![
                    "client".into(),
                    "--connect".into(),
                    connect.to_string(),
                    "--count".into(),
                    count.to_string(),
                ]
            }
        };
        let stream = self.stream();
        for (flag, value) in [
            ("--bytes", stream.bytes),
            ("--sent-already", stream.sent_already),
            ("--received-already", stream.received_already),
            ("--timeout-secs", stream.timeout_secs),
        ] {
            args.extend([flag.to_owned(), value.to_string()]);
        }
        args
    }
}

impl ServerArgs {
    /// A server that adopts nothing and listens nowhere yet: the constructors fill in the rest.
    fn new(stream: StreamArgs) -> Self {
        Self {
            listen: None,
            from_listen_fds: false,
            expect: 1,
            reuseport: None,
            mirror: false,
            script: Vec::new(),
            stream,
        }
    }
}

impl fmt::Display for PeerArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server(ServerArgs {
                listen: Some(addr),
                reuseport: Some(index),
                ..
            }) => write!(f, "server {index} on {addr}"),
            Self::Server(ServerArgs {
                listen: Some(addr), ..
            }) => write!(f, "server on {addr}"),
            Self::Server(ServerArgs { listen: None, .. }) => {
                write!(f, "server of handed-over sockets")
            }
            Self::Client(client) => write!(f, "client of {}", client.connect),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_back() {
        let addr = "198.18.0.100:8080".parse().unwrap();
        let stream = StreamArgs {
            sent_already: 5,
            received_already: 7,
            ..StreamArgs::new(2048)
        };
        for args in [
            PeerArgs::server(addr, 10, stream),
            PeerArgs::mirror_server(addr, 10, stream),
            PeerArgs::adopting_server(stream),
            PeerArgs::shared_server(addr, 2, 10, stream),
            PeerArgs::scripted_adopting_server(
                stream,
                vec![
                    PeerCommand::Send { bytes: 700 },
                    PeerCommand::Verify { until: Some(2424) },
                ],
            ),
            PeerArgs::client(addr, 3, StreamArgs::new(1)),
        ] {
            let argv = std::iter::once("tcpmig-peer".to_owned()).chain(args.to_args());
            assert_eq!(PeerArgs::try_parse_from(argv.clone()).unwrap(), args);
            let PeerMode::Streams(streams) = PeerMode::try_parse_from(argv).unwrap() else {
                panic!("{args}: not a stream mode of tcpmig-peer");
            };
            assert_eq!(streams, args);
        }
    }

    #[test]
    fn server_needs_exactly_one_source_of_connections() {
        let parse =
            |args: &[&str]| PeerArgs::try_parse_from([&["tcpmig-peer", "server"], args].concat());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--listen", "[::1]:1", "--from-listen-fds"]).is_err());
        assert!(parse(&["--from-listen-fds", "--expect", "3"]).is_err());
        assert!(parse(&["--listen", "[::1]:1", "--expect", "3"]).is_ok());
        assert!(parse(&["--from-listen-fds", "--reuseport", "1"]).is_err());
        assert!(parse(&["--listen", "[::1]:1", "--script", "verify"]).is_err());
        assert!(parse(&["--from-listen-fds", "--script", "dance"]).is_err());
    }
}
