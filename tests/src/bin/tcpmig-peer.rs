//! `tcpmig-peer`: one side of the test bed's verifiable TCP traffic. The command line, the
//! streams and the stdin/stdout protocol are documented in `tcpmig_testbed::peer`.

use std::process::ExitCode;

use clap::Parser;
use tcpmig_testbed::peer::PeerArgs;
use tcpmig_testbed::peer_process::run;

fn main() -> ExitCode {
    match run(PeerArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpmig-peer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
