//! `tcpmig-peer`: the test bed's one traffic program. Its byte-stream roles, their command line
//! and stdin/stdout protocol are documented in `tcpmig_testbed::peer`; its open-loop load modes
//! (`load-worker`, `echo-server`) in `tcpmig_testbed::load` and `tcpmig_testbed::echo`; its
//! new-connection prober (`probe`) in `tcpmig_testbed::probe`.

use std::process::ExitCode;

use clap::Parser;
use tcpmig_testbed::peer::PeerMode;
use tcpmig_testbed::{echo, load, peer_process, probe};

fn main() -> ExitCode {
    let result = match PeerMode::parse() {
        PeerMode::Streams(args) => peer_process::run(args),
        PeerMode::LoadWorker(args) => load::run_worker(&args),
        PeerMode::EchoServer(args) => echo::serve(&args),
        PeerMode::Probe(args) => probe::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpmig-peer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
