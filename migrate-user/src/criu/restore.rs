//! The restore side of the hook: freeze the connections to restore before their address
//! arrives (pre-restore or setup-namespaces), then announce the address and lift the freeze
//! (post-restore or network-unlock), just before CRIU switches repair off.
use std::time::Duration;

use super::{
    Config, CriuError, GuardSpec, HookEnv, HookReport, Sidecar, Step as _, attach_freeze,
    freeze_name, guard, remove_freeze,
};
use crate::{
    freeze,
    net::{self, NetError, Netns},
};

/// Freezes the connections to restore before their address is on the destination, then adds it
/// when configured.
pub(super) fn lock_destination(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    sidecar: &Sidecar,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let (name, mut freeze) = attach_freeze(netns, config)?;
    let services = if config.services.is_empty() {
        &sidecar.services
    } else {
        &config.services
    };
    freeze
        .freeze_services(services, config.deadline)
        .step("freezing the services")?;
    freeze
        .freeze_tuples(&sidecar.tuples(), config.deadline)
        .step("freezing the connections to restore")?;
    report.services = services.len();
    report.connections = sidecar.tuples.len();
    if let Some((addr, prefix_len)) = config.address {
        net::add_address(netns, &config.dev, addr, prefix_len)
            .step("adding the service address on the destination")?;
    }
    guard::spawn(
        netns,
        &GuardSpec {
            name: name.clone(),
            criu_pid: env.criu_pid,
            task_pid: None,
            addresses: Vec::new(),
            deadline_s: config.deadline.as_secs_f64(),
        },
    )?;
    freeze.keep();
    report.freeze = Some(name);
    Ok(())
}

/// Announces the connections' addresses from their new home, then lifts and removes the freeze:
/// CRIU switches repair off right after, with traffic flowing.
pub(super) fn unlock(
    config: &Config,
    netns: &Netns,
    sidecar: &Sidecar,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let name = freeze_name(netns);
    let mut addresses = sidecar.local_addresses();
    addresses.extend(config.address.map(|(addr, _)| addr));
    for addr in addresses {
        // Back to back, as the agent does: the freeze holds until they are out, so spacing
        // them (30 ms) lengthened every connection's blackout by 60 ms per address.
        match net::announce(
            netns,
            &config.dev,
            addr,
            net::ANNOUNCE_COUNT,
            Duration::ZERO,
        ) {
            // Not ours to announce (a failed dump's unlock, an address on another interface).
            Ok(()) | Err(NetError::NotOnInterface { .. }) => {}
            Err(source) => {
                let _ = freeze::remove(&name);
                return Err(CriuError::Net {
                    step: "announcing the service address",
                    source: Box::new(source),
                });
            }
        }
    }
    remove_freeze(&name)?;
    report.freeze = Some(name);
    report.connections = sidecar.tuples.len();
    Ok(())
}
