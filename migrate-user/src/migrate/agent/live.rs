//! Handing the live connections to the application, group by group (see [`crate::handoff`]).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    process::ExitStatus,
};

use super::{AgentConfig, groups::Group};
use crate::{
    handoff::{self, ExecCommand, HandoffError},
    net::Netns,
    repair::RestoredSocket,
    shard::{self, Shard},
    sys::{self, CapabilitySet},
    tuple::Tuple,
};

/// The live connections, in their groups, until they are handed to the application.
pub struct LiveConnections {
    groups: Vec<Shard<Group>>,
    /// Where the application runs: the namespace the connections are in.
    netns: String,
    /// All the application gets (see [`AgentConfig::app_capabilities`]).
    app_capabilities: CapabilitySet,
}

impl LiveConnections {
    /// The `listeners` made ahead, one per service (both families of a dual-stack service), go
    /// with the first group, after its connections: its process accepts the new connections (an
    /// application finds them among the fds it is handed with SO_ACCEPTCONN; their names say
    /// `0.0.0.0:0` or `[::]:0` for the remote end).
    pub(super) fn new(
        groups: Vec<Shard<Group>>,
        config: &AgentConfig,
        listeners: Vec<(SocketAddr, OwnedFd)>,
    ) -> Self {
        if let Some(first) = groups.first() {
            for (service, fd) in listeners {
                let unspecified = SocketAddr::new(unspecified_like(service.ip()), 0);
                let tuple = Tuple {
                    local: service,
                    remote: unspecified,
                };
                first.run(move |group| group.live.push(RestoredSocket { tuple, fd }));
            }
        }
        Self {
            groups,
            netns: config.netns.clone(),
            app_capabilities: config.app_capabilities,
        }
    }

    /// Groups, each handed to one process.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Sends each group in turn to the receiver at `path` (see [`handoff::send_fds`]): one
    /// connection to the receiver per group.
    pub fn send_to(self, path: &std::path::Path) -> Result<(), HandoffError> {
        for group in &self.groups {
            let path = path.to_owned();
            group.run(move |group| handoff::send_fds(&std::mem::take(&mut group.live), &path))?;
        }
        Ok(())
    }

    /// Hands the connections to `command` in their namespace: one group becomes it (this process
    /// is replaced, see [`handoff::exec_with_fds`]); several start it once per group (see
    /// [`handoff::spawn_with_fds`]) and wait for them all. Returns the first failure's exit
    /// status, or success. The command gets the application's capabilities and no other: each
    /// group's thread limits itself to them before it executes or starts the command.
    pub fn run(self, command: ExecCommand) -> Result<ExitStatus, HandoffError> {
        let Self {
            groups,
            netns,
            app_capabilities,
        } = self;
        let count = groups.len();
        if count == 1 {
            let exec = groups[0].run(move |group| {
                enter_confined(&netns, app_capabilities)?;
                handoff::exec_with_fds(std::mem::take(&mut group.live), command)
            });
            match exec? {}
        }
        let command = std::sync::Arc::new(command);
        let started = shard::run_all(&groups, move |k, group| {
            enter_confined(&netns, app_capabilities)?;
            let env = [
                ("TCPMIG_SHARD", k.to_string()),
                ("TCPMIG_SHARDS", count.to_string()),
            ];
            handoff::spawn_with_fds(std::mem::take(&mut group.live), &command, &env)
        });
        let children = started.into_iter().collect::<Result<Vec<_>, _>>()?;
        // The groups' threads live until the children end: each child gets SIGTERM when the
        // thread that started it ends (PR_SET_PDEATHSIG), so when this process dies.
        let status = handoff::wait_all(children);
        drop(groups);
        status
    }
}

/// The application runs in the namespace its connections are in, with `caps` only: the calling
/// thread enters it, then limits itself to `caps` (see [`sys::confine_for_exec`]).
fn enter_confined(netns: &str, caps: CapabilitySet) -> Result<(), HandoffError> {
    Netns::open(netns)?.enter_current_thread()?;
    sys::confine_for_exec(caps).map_err(|source| HandoffError::Capabilities { caps, source })?;
    Ok(())
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}
