//! What the clients heard when a service's address moved: the announcement checks of the IPv6
//! and dual-stack migrations.
use std::net::IpAddr;

use anyhow::{Result, ensure};
use tcpmig_testbed::{Announcement, IFACE, TestBed};

/// The client runs with the kernel's defaults for unsolicited neighbour advertisements: they
/// update an existing entry (drop_unsolicited_na=0) and create none (accept_untracked_na=0), so
/// the move relies on the entry the client already has and on the override flag.
pub fn na_defaults(bed: &TestBed) -> Result<()> {
    for (setting, default) in [("drop_unsolicited_na", "0"), ("accept_untracked_na", "0")] {
        let value = bed
            .client()
            .sysctl(&format!("net.ipv6.conf.{IFACE}.{setting}"))?;
        ensure!(value == default, "the client's {setting} is {value}");
    }
    Ok(())
}

/// Among `heard`, `ip` was announced, only from `mac` and as `mac`'s; an NA with the override
/// flag (so that the clients' entries take it) and not the solicited one (nobody asked).
pub fn announced_by(heard: &[Announcement], ip: IpAddr, mac: &str) -> Result<()> {
    let of_ip: Vec<&Announcement> = heard.iter().filter(|a| a.address == ip).collect();
    ensure!(!of_ip.is_empty(), "no announcement of {ip}: {heard:?}");
    for announcement in &of_ip {
        ensure!(
            announcement.from == mac && announcement.mac.as_deref() == Some(mac),
            "{ip} announced for another MAC than {mac}: {announcement:?}"
        );
        if let Some(flags) = announcement.flags {
            ensure!(
                flags.overriding && !flags.solicited && !flags.router,
                "{announcement:?}"
            );
        }
    }
    ensure!(
        of_ip.iter().all(|a| a.flags.is_some() == ip.is_ipv6()),
        "{ip} announced with the other family's message: {of_ip:?}"
    );
    eprintln!("{} announcements of {ip} from {mac}", of_ip.len());
    Ok(())
}
