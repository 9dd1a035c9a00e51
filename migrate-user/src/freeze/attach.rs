//! Loading the programs and attaching them to an interface (tcx, or clsact before 6.6), and
//! taking them off again.
use std::{ffi::CString, os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, TcAttach},
    },
    util::KernelVersion,
};

use super::{AttachMode, FreezeError, FreezeInfo, Links, pins};
use crate::{
    net::Netns,
    sys::{self, Capability},
};

/// The compiled freeze programs, built from migrate-ebpf by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/migrate-ebpf"));

pub(super) const INGRESS_PROGRAM: &str = "tcpmig_ingress";
pub(super) const EGRESS_PROGRAM: &str = "tcpmig_egress";

fn programs() -> [(&'static str, TcAttachType); 2] {
    [
        (INGRESS_PROGRAM, TcAttachType::Ingress),
        (EGRESS_PROGRAM, TcAttachType::Egress),
    ]
}

/// Whether [`attach_programs`] pins the tcx links or hands them over.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Pin {
    Yes,
    No,
}

/// Loads the programs, their maps pinned in `dir` (the programs declare them pinned by name).
fn load(dir: &Path) -> Result<Ebpf, FreezeError> {
    load_object(PROGRAMS, dir)
}

/// Loads an eBPF `object`, its maps pinned in `dir`.
pub(super) fn load_object(object: &[u8], dir: &Path) -> Result<Ebpf, FreezeError> {
    Ok(EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(object)?)
}

/// Program `name` of `ebpf`, loaded into the kernel.
pub(super) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, FreezeError> {
    let classifier: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)?
        .try_into()?;
    classifier.load()?;
    Ok(classifier)
}

/// Loads the programs (their maps pinned in `dir`) and attaches them; runs inside `netns`. The
/// tcx links are pinned in `dir`, or returned with [`Pin::No`].
pub(super) fn attach_programs(
    netns: &Netns,
    dev: &str,
    name: &str,
    dir: &Path,
    pin: Pin,
) -> Result<(FreezeInfo, Links), FreezeError> {
    let ifindex = ifindex(netns, dev)?;
    let mut ebpf = load(dir)?;
    let attach = attach_mode(ifindex, dev)?;
    let mut owned = Vec::new();
    for (program, attach_type) in programs() {
        let classifier = classifier(&mut ebpf, program)?;
        let link_id = classifier.attach(ifindex, TcAttach::Auto(attach_type))?;
        let link = classifier.take_link(link_id)?;
        match (attach, pin) {
            (AttachMode::Tcx, Pin::Yes) => {
                let link: FdLink = link.try_into()?;
                let _: PinnedLink = link.pin(dir.join(program))?;
            }
            (AttachMode::Tcx, Pin::No) => owned.push(link.try_into()?),
            // A clsact filter stays on the qdisc once our handle is gone; remove() (or the
            // unpinned handle's drop) deletes it.
            (AttachMode::Clsact, _) => std::mem::forget(link),
        }
    }
    let info = FreezeInfo {
        name: name.to_owned(),
        netns: netns.spec().to_owned(),
        netns_inode: netns.inode(),
        dev: dev.to_owned(),
        ifindex,
        attach,
    };
    let links = match pin {
        Pin::Yes => Links::Pinned,
        Pin::No => Links::Owned { _links: owned },
    };
    Ok((info, links))
}

fn unknown_interface(netns: &Netns, dev: &str) -> FreezeError {
    FreezeError::UnknownInterface {
        dev: dev.to_owned(),
        netns: netns.spec().to_owned(),
    }
}

/// The index of `dev` in the namespace this thread is in.
pub(super) fn ifindex(netns: &Netns, dev: &str) -> Result<u32, FreezeError> {
    nix::net::if_::if_nametoindex(dev).map_err(|_| unknown_interface(netns, dev))
}

/// tcx on kernels from 6.6 (an unreadable version is taken as new enough, and attach says
/// otherwise); clsact before, whose qdisc is added here when missing.
fn attach_mode(ifindex: u32, dev: &str) -> Result<AttachMode, FreezeError> {
    let tcx = KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0));
    if tcx {
        return Ok(AttachMode::Tcx);
    }
    match tc::qdisc_add_clsact(ifindex) {
        // An existing clsact (ours or someone's) is what we need.
        Ok(()) => {}
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => {
            return Err(FreezeError::Clsact {
                dev: dev.to_owned(),
                source,
            });
        }
    }
    Ok(AttachMode::Clsact)
}

/// Takes the programs of a freeze off its interface, by the way they were attached.
pub(super) fn detach(info: &FreezeInfo) -> Result<(), FreezeError> {
    match info.attach {
        AttachMode::Tcx => detach_tcx_links(&info.name),
        AttachMode::Clsact => detach_clsact(info),
    }
}

pub(super) fn detach_clsact(info: &FreezeInfo) -> Result<(), FreezeError> {
    let netns = Netns::open(&info.netns)?;
    netns.run(|| {
        for (program, attach_type) in programs() {
            // Already gone (interface deleted, say) is fine: we are removing it.
            let _ = tc::qdisc_detach_program(info.ifindex, attach_type.into(), program);
        }
    })?;
    Ok(())
}

pub(super) fn detach_tcx_links(name: &str) -> Result<(), FreezeError> {
    for (program, _) in programs() {
        detach_pinned_link(name, &pins::dir(name).join(program))?;
    }
    Ok(())
}

/// Detaches the tcx link pinned at `path` (of freeze or steering `name`). Already gone (a
/// half-made one, or the interface was deleted) is fine: we are removing it.
pub(super) fn detach_pinned_link(name: &str, path: &Path) -> Result<(), FreezeError> {
    match sys::detach_pinned_link(path) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOLINK)) => Ok(()),
        Err(source) => Err(FreezeError::Io {
            name: name.to_owned(),
            what: "detaching a program",
            source,
        }),
    }
}

/// Names of the tcpmig programs attached with tcx on `dev` in `netns`, both directions: how a
/// test or an operator checks that nothing of ours is left on an interface.
pub fn attached_programs(netns: &Netns, dev: &str) -> Result<Vec<String>, FreezeError> {
    let dev_c = CString::new(dev).map_err(|_| unknown_interface(netns, dev))?;
    netns.run(|| {
        let mut names = Vec::new();
        for (_, attach_type) in programs() {
            let (_, infos) = SchedClassifier::query_tcx(dev_c.as_c_str(), attach_type)?;
            names.extend(
                infos
                    .iter()
                    .filter_map(|info| info.name_as_str().map(str::to_owned))
                    .filter(|name| name.starts_with("tcpmig_")),
            );
        }
        Ok(names)
    })?
}

/// Fails early, naming the capability, instead of with a bare EPERM from the bpf syscall.
pub fn check_privileges() -> Result<(), FreezeError> {
    sys::require_capabilities(
        "freezing traffic with eBPF",
        &[Capability::NetAdmin, Capability::Bpf],
    )?;
    Ok(())
}

/// Runs the ingress program once on a raw Ethernet frame (BPF_PROG_TEST_RUN), with the maps of
/// freeze `name`; returns the TC verdict. For tests and `tcpmig` self checks.
pub fn test_run_ingress(name: &str, frame: &[u8]) -> Result<i32, FreezeError> {
    let mut ebpf = load(&pins::dir(name))?;
    let classifier = classifier(&mut ebpf, INGRESS_PROGRAM)?;
    let verdict =
        sys::prog_test_run(classifier.fd()?.as_fd(), frame).map_err(|source| FreezeError::Io {
            name: name.to_owned(),
            what: "BPF_PROG_TEST_RUN",
            source,
        })?;
    Ok(verdict as i32)
}
