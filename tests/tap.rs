//! TAP devices and their backend against the real kernel: each test makes its
//! own network namespace (removed when it ends), opens TAPs on a thread inside it
//! and plays the guest's side of the wire itself. Needs root and /dev/net/tun.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinvm::net::netns::cleanup_stale;
use twinvm::net::probe::internet_checksum;
use twinvm::net::{
    ethertype, ipv4_source, NetNs, Tap, TapBackend, TapError, ETHERTYPE_ARP, ETHERTYPE_IPV4,
};

const PREFIX: &str = "twinvm-taptest";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const WAIT: Duration = Duration::from_secs(5);

fn namespace() -> NetNs {
    cleanup_stale(PREFIX).expect("cleaning up namespaces of earlier runs");
    NetNs::create(PREFIX).expect("creating a network namespace (needs root)")
}

/// The next frame `accept` takes, skipping others (IPv6 router solicitations and
/// the like that the kernel sends on a new link); panics after `WAIT`.
fn wait_for_frame(backend: &TapBackend, what: &str, accept: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut skipped = 0;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match backend.rx().recv_timeout(left) {
            Ok(frame) if accept(&frame) => return frame,
            Ok(_) => skipped += 1,
            Err(_) => break,
        }
    }
    panic!(
        "no {what} within {WAIT:?} ({skipped} other frames; {:?})",
        backend.stats()
    );
}

/// Wait (bounded) until the kernel runs the TAP's link.
fn wait_running(tap: &Tap) {
    let deadline = Instant::now() + WAIT;
    while !tap.is_running().unwrap() {
        assert!(
            Instant::now() < deadline,
            "{} not running after {WAIT:?}",
            tap.name()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn is_arp_op(frame: &[u8], op: u16) -> bool {
    ethertype(frame) == Some(ETHERTYPE_ARP)
        && frame.len() >= 42
        && frame[20..22] == op.to_be_bytes()
}

/// An ARP reply from the guest (`GUEST_MAC`, `guest_ip`) to the host interface.
fn arp_reply(host_mac: [u8; 6], host_ip: [u8; 4], guest_ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&guest_ip);
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&host_ip);
    f.resize(60, 0);
    f
}

/// A UDP datagram from the guest to the host, as an Ethernet frame.
fn udp_frame(
    host_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id, DF, TTL, UDP, checksum
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&src.1.to_be_bytes());
    ip.extend_from_slice(&dst.1.to_be_bytes());
    ip.extend_from_slice(&(udp_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    ip.extend_from_slice(payload);
    let mut f = Vec::new();
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

#[test]
fn arp_and_udp_cross_the_tap_both_ways() {
    let ns = namespace();
    ns.enter_on_thread(|| {
        let tap = Tap::open("tw0").expect("creating TAP tw0");
        assert!(tap.created(), "tw0 did not exist: this open created it");
        ns.addr_add("tw0", "10.99.0.1/24").unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&wakes);
        let backend = TapBackend::start(tap, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();

        // A datagram to 10.99.0.2 makes the kernel ask who has that address.
        let host = UdpSocket::bind("10.99.0.1:0").unwrap();
        let host_port = host.local_addr().unwrap().port();
        host.send_to(b"to the guest", "10.99.0.2:7777").unwrap();
        let request = wait_for_frame(&backend, "ARP request", |f| is_arp_op(f, 1));
        assert_eq!(&request[0..6], &[0xff; 6], "an ARP request is broadcast");
        assert_eq!(&request[38..42], &[10, 99, 0, 2], "target protocol address");
        assert_eq!(ipv4_source(&request), Some([10, 99, 0, 1]));
        let host_mac: [u8; 6] = request[6..12].try_into().unwrap();
        assert_eq!(&request[22..28], &host_mac, "sender hardware address");

        // Answer as the guest: the queued datagram follows, addressed to its MAC.
        backend
            .send(&arp_reply(host_mac, [10, 99, 0, 1], [10, 99, 0, 2]))
            .unwrap();
        let udp = wait_for_frame(&backend, "UDP frame to the guest", |f| {
            ethertype(f) == Some(ETHERTYPE_IPV4) && f.len() > 42 && f[23] == 17
        });
        assert_eq!(&udp[0..6], &GUEST_MAC);
        assert_eq!(ipv4_source(&udp), Some([10, 99, 0, 1]));
        assert_eq!(&udp[30..34], &[10, 99, 0, 2]);
        assert_eq!(&udp[36..38], &7777u16.to_be_bytes());
        assert_eq!(&udp[42..], b"to the guest");

        // And the guest's reply reaches the host socket.
        backend
            .send(&udp_frame(
                host_mac,
                (Ipv4Addr::new(10, 99, 0, 2), 7777),
                (Ipv4Addr::new(10, 99, 0, 1), host_port),
                b"to the host",
            ))
            .unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = host.recv_from(&mut buf).expect("the guest's datagram");
        assert_eq!(&buf[..n], b"to the host");
        assert_eq!(from, SocketAddr::from(([10, 99, 0, 2], 7777)));

        let stats = backend.stats();
        assert!(stats.rx_frames >= 2, "{stats:?}");
        assert_eq!(
            (stats.tx_frames, stats.tx_dropped, stats.rx_dropped),
            (2, 0, 0)
        );
        assert!(
            wakes.load(Ordering::Relaxed) >= 2,
            "wake was called per batch"
        );

        // Frames that are no Ethernet frame are refused, not sent or counted.
        for len in [0, 13, 65536] {
            let err = backend.send(&vec![0u8; len]).unwrap_err();
            assert!(matches!(err, TapError::FrameLength { .. }), "{err}");
            assert!(err.to_string().contains(&format!("{len} bytes")), "{err}");
        }
        assert_eq!(backend.stats().tx_frames, 2);

        let start = Instant::now();
        drop(backend);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "stopping took {:?}",
            start.elapsed()
        );
    })
    .unwrap();
    // The TAP was not persistent: it went away with the backend.
    let links = ns.ip(["-o", "link", "show"]).unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("tw0"));
}

#[test]
fn invalid_names_are_refused_with_the_reason() {
    for (name, reason) in [
        ("", "empty"),
        ("0123456789abcdef", "longer than 15 bytes"),
        ("a/b", "`/`"),
        ("tap 0", "whitespace"),
        ("tap%d", "`%`"),
    ] {
        let err = Tap::open(name).unwrap_err();
        assert!(matches!(err, TapError::InvalidName(_)), "{name:?}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(reason) && msg.contains("invalid interface name"),
            "{msg}"
        );
    }
}

#[test]
fn attaches_to_a_persistent_tap_once_at_a_time() {
    let ns = namespace();
    ns.add_tap("ptap0").unwrap();
    ns.add_bridge("br0").unwrap();
    ns.addr_add("ptap0", "10.98.0.1/24").unwrap();
    ns.enter_on_thread(|| {
        let tap = Tap::open("ptap0").expect("attaching to persistent ptap0");
        assert!(!tap.created());
        assert_eq!(tap.name(), "ptap0");

        let err = Tap::open("ptap0").unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("ptap0 is in use"), "{err}");

        let err = Tap::open("br0").unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
        assert!(err.to_string().contains("br0"), "{err}");

        // Frames flow through the attached TAP once the kernel has seen its
        // carrier come on: a broadcast from the host side.
        let backend = TapBackend::start(tap, || {}).unwrap();
        wait_running(backend.tap());
        let host = UdpSocket::bind("10.98.0.1:0").unwrap();
        host.set_broadcast(true).unwrap();
        host.send_to(b"hello", "10.98.0.255:9").unwrap();
        let frame = wait_for_frame(&backend, "broadcast datagram", |f| {
            ethertype(f) == Some(ETHERTYPE_IPV4) && f.ends_with(b"hello")
        });
        assert_eq!(&frame[0..6], &[0xff; 6]);
        drop(backend);

        // Closing did not remove the persistent interface: it can be attached
        // again. The kernel detaches on the last close of the fd, and a child
        // that another test thread is forking may hold a copy for a moment
        // (until its exec closes it), so Busy is retried for a bounded time.
        let deadline = Instant::now() + WAIT;
        let again = loop {
            match Tap::open("ptap0") {
                Err(TapError::Busy { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => break other.expect("attaching again after close"),
            }
        };
        assert!(!again.created());
    })
    .unwrap();
}

#[test]
fn a_full_receive_queue_drops_and_counts() {
    const SENT: u64 = 40;
    const QUEUE: usize = 4;
    let ns = namespace();
    ns.enter_on_thread(|| {
        let tap = Tap::open("qtap0").unwrap();
        ns.addr_add("qtap0", "10.97.0.1/24").unwrap();
        let backend = TapBackend::start_with_queue(tap, QUEUE, || {}).unwrap();
        let host = UdpSocket::bind("10.97.0.1:0").unwrap();
        host.set_broadcast(true).unwrap();
        for i in 0..SENT {
            host.send_to(&i.to_le_bytes(), "10.97.0.255:9").unwrap();
        }
        let deadline = Instant::now() + WAIT;
        let mut stats = backend.stats();
        while stats.rx_frames + stats.rx_dropped < SENT && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            stats = backend.stats();
        }
        // Nobody took frames: the queue holds QUEUE of them, the rest were dropped.
        assert_eq!(stats.rx_frames, QUEUE as u64, "{stats:?}");
        assert!(stats.rx_frames + stats.rx_dropped >= SENT, "{stats:?}");
        assert_eq!(backend.rx().len(), QUEUE);

        // Once the queue is drained, frames are queued again.
        while backend.try_recv().is_some() {}
        host.send_to(b"after drain", "10.97.0.255:9").unwrap();
        wait_for_frame(&backend, "datagram after the drain", |f| {
            f.ends_with(b"after drain")
        });
    })
    .unwrap();
}

#[test]
fn the_backend_reports_an_interface_deleted_under_it() {
    let ns = namespace();
    ns.add_tap("gone0").unwrap();
    ns.enter_on_thread(|| {
        let tap = Tap::open("gone0").unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&wakes);
        let backend = TapBackend::start(tap, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(backend.rx_failure().is_none());
        ns.ip(["link", "del", "gone0"]).unwrap();
        let deadline = Instant::now() + WAIT;
        while backend.rx_failure().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let failure = backend.rx_failure().expect("the receive thread noticed");
        assert!(failure.to_string().contains("gone0"), "{failure}");
        assert!(
            wakes.load(Ordering::Relaxed) >= 1,
            "the VMM was woken to notice"
        );
        // Sending fails loudly too, never silently.
        let err = backend.send(&[0u8; 60]).unwrap_err();
        assert!(err.to_string().contains("gone0"), "{err}");
    })
    .unwrap();
}

#[test]
fn frames_sent_while_the_interface_is_down_are_dropped_and_counted() {
    let ns = namespace();
    ns.enter_on_thread(|| {
        let tap = Tap::open("dtap0").unwrap();
        assert!(tap.is_running().unwrap(), "a created TAP is up at once");
        let backend = TapBackend::start(tap, || {}).unwrap();
        let mut frame = vec![0u8; 60];
        frame[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame[6..12].copy_from_slice(&GUEST_MAC);
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental

        ns.ip(["link", "set", "dtap0", "down"]).unwrap();
        assert!(!backend.tap().is_running().unwrap());
        backend.send(&frame).unwrap();
        backend.send(&frame).unwrap();
        let stats = backend.stats();
        assert_eq!((stats.tx_frames, stats.tx_dropped), (0, 2), "{stats:?}");

        ns.link_up("dtap0").unwrap();
        backend.send(&frame).unwrap();
        let stats = backend.stats();
        assert_eq!((stats.tx_frames, stats.tx_dropped), (1, 2), "{stats:?}");
        assert!(backend.rx_failure().is_none(), "a down link is no failure");
    })
    .unwrap();
}

/// Send `frame` out of interface `dev` as it is, through a packet socket in the
/// calling thread's namespace (the way to put a frame longer than the MTU allows
/// on a TAP: the kernel lets a VLAN-tagged frame be 4 bytes longer).
fn send_raw_frame(dev: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {dev}");
    // SAFETY: socket(2) takes no pointers; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain integers and bytes; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: the frame pointer and length describe a live slice; the address
    // pointer and length describe `addr`, a live sockaddr_ll.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        sent,
        frame.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn frames_longer_than_65535_bytes_are_dropped_not_cut() {
    let ns = namespace();
    ns.enter_on_thread(|| {
        let tap = Tap::open("btap0").unwrap();
        // A TAP's MTU is at most 65521: 65535 less the Ethernet header.
        ns.ip(["link", "set", "btap0", "mtu", "65521"]).unwrap();
        let backend = TapBackend::start(tap, || {}).unwrap();
        let mut frame = vec![0u8; 65535 + 4];
        frame[0..6].copy_from_slice(&GUEST_MAC);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        frame[12..14].copy_from_slice(&0x8100u16.to_be_bytes()); // 802.1Q tag
        frame[14..16].copy_from_slice(&5u16.to_be_bytes()); // VLAN 5
        frame[16..18].copy_from_slice(&0x88b5u16.to_be_bytes());
        frame[18..].fill(1);
        send_raw_frame("btap0", &frame);
        // Then the longest frame passed on: 65535 bytes, untagged.
        let mut longest = vec![2u8; 65535];
        longest[0..6].copy_from_slice(&GUEST_MAC);
        longest[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        longest[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        send_raw_frame("btap0", &longest);

        let got = wait_for_frame(&backend, "65535-byte frame", |f| f.len() > 60_000);
        assert_eq!(got, longest, "the longest frame arrives whole");
        let stats = backend.stats();
        assert_eq!(
            stats.rx_dropped, 1,
            "the 65539-byte frame was dropped: {stats:?}"
        );
    })
    .unwrap();
}
