//! The freeze program drops a TCP packet that matches a map entry, proven twice: on crafted frames
//! with BPF_PROG_TEST_RUN, and with a real SYN crossing the test bed's veths.
use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::Result;
use tcpmig::{
    freeze::{self, Freeze, RemoveOnDrop},
    net::Netns,
    tuple::Tuple,
};
use tcpmig_testbed::{IFACE, TestBed};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const PORT: u16 = 8080;

fn attach(bed: &TestBed, name: &str) -> Result<RemoveOnDrop> {
    let netns = Netns::open(bed.source().name())?;
    Ok(RemoveOnDrop::new(Freeze::attach(&netns, IFACE, name)?))
}

/// An Ethernet frame carrying a TCP SYN from `from` to `to`.
fn syn_frame(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&from.port().to_be_bytes());
    tcp.extend_from_slice(&to.port().to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[0x50, 0x02]); // data offset 5 words, SYN
    tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
    match (from.ip(), to.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + tcp.len()) as u16;
            frame.extend_from_slice(&[0x45, 0]);
            frame.extend_from_slice(&total.to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frame.extend_from_slice(&0x86DDu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[6, 64]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
        }
        _ => panic!("mixed address families"),
    }
    frame.extend_from_slice(&tcp);
    frame
}

#[test]
fn prog_test_run_drops_only_after_a_map_update() -> Result<()> {
    let bed = TestBed::new()?;
    let name = format!("{}-testrun", bed.prefix());
    let mut freeze = attach(&bed, &name)?;
    for ipv6 in [false, true] {
        let service = SocketAddr::new(TestBed::service(ipv6), PORT);
        let client = SocketAddr::new(
            if ipv6 {
                bed.client().v6().into()
            } else {
                bed.client().v4().into()
            },
            40000,
        );
        let frame = syn_frame(client, service);
        assert_eq!(
            freeze::test_run_ingress(&name, &frame)?,
            TC_ACT_OK,
            "empty map passes"
        );

        freeze.freeze_services(&[service], Duration::from_secs(30))?;
        assert_eq!(
            freeze::test_run_ingress(&name, &frame)?,
            TC_ACT_SHOT,
            "service entry drops"
        );
        freeze.thaw_services(&[service])?;
        assert_eq!(
            freeze::test_run_ingress(&name, &frame)?,
            TC_ACT_OK,
            "thawed passes"
        );

        let tuple = Tuple {
            local: service,
            remote: client,
        };
        freeze.freeze_tuples(&[tuple], Duration::from_secs(30))?;
        assert_eq!(
            freeze::test_run_ingress(&name, &frame)?,
            TC_ACT_SHOT,
            "4-tuple entry drops"
        );
        let other_client = SocketAddr::new(client.ip(), 40001);
        assert_eq!(
            freeze::test_run_ingress(&name, &syn_frame(other_client, service))?,
            TC_ACT_OK,
            "another 4-tuple of the same port passes"
        );
        freeze.thaw_tuples(&[tuple])?;
        assert_eq!(freeze::test_run_ingress(&name, &frame)?, TC_ACT_OK);

        freeze.freeze_services(&[service], Duration::ZERO)?;
        assert_eq!(
            freeze::test_run_ingress(&name, &frame)?,
            TC_ACT_OK,
            "an entry past its deadline passes"
        );
        freeze.thaw_all()?;
    }
    assert_eq!(freeze.counters()?.syn_dropped, 4);
    assert_eq!(freeze.counters()?.passed_after_deadline, 2);
    Ok(())
}

#[test]
fn real_syn_times_out_while_frozen_and_connects_after() -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(false), PORT);
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let connect = || {
        bed.client()
            .run(|| TcpStream::connect_timeout(&service, Duration::from_millis(1500)))
    };
    connect()?.expect("connects before the freeze");

    let name = format!("{}-syn", bed.prefix());
    let mut freeze = attach(&bed, &name)?;
    freeze.freeze_services(&[service], Duration::from_secs(30))?;
    let error = connect()?.expect_err("no connection while frozen");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::TimedOut,
        "the SYN is dropped silently (no RST: that would be ConnectionRefused): {error}"
    );
    assert!(freeze.counters()?.syn_dropped >= 1);

    freeze.thaw_services(&[service])?;
    connect()?.expect("connects once the entry is removed");
    drop(freeze);
    assert!(freeze::attached_programs(&Netns::open(bed.source().name())?, IFACE)?.is_empty());
    drop(listener);
    Ok(())
}
