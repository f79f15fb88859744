//! Test clients for tests, drills and benchmarks: an ICMP echo probe (raw socket,
//! needs root; no `ping` binary required), the client of the `counter` test
//! guest's UDP protocol, and a sender of one raw Ethernet frame (packet socket,
//! needs root). All create their sockets in the calling thread's network
//! namespace (see [`super::NetNs::enter_on_thread`]).
//!
//! The counter protocol, all integers little-endian:
//! request `"TWCQ"` + u64 request id (12 bytes);
//! reply `"TWCR"` + u64 request id + u64 counter value (20 bytes).

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{check_interface_name, InterfaceNameError, ETHERNET_HEADER_LEN};

/// Why a probe failed (a reply that does not come in time is not an error).
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("{op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("opening a raw ICMP socket needs root or CAP_NET_RAW ({0})")]
    RawSocketDenied(io::Error),
    #[error("opening a packet socket needs root or CAP_NET_RAW ({0})")]
    PacketSocketDenied(io::Error),
    #[error(transparent)]
    InterfaceName(#[from] InterfaceNameError),
    #[error("no network interface named {0:?} in this network namespace")]
    NoSuchInterface(String),
    #[error("a raw frame must be {ETHERNET_HEADER_LEN} to {MAX_RAW_FRAME} bytes (an Ethernet header, no FCS); this one has {0}")]
    FrameLength(usize),
    #[error("sending a raw frame on {ifname}: the kernel took {sent} of its {len} bytes")]
    ShortSend {
        ifname: String,
        sent: usize,
        len: usize,
    },
}

/// The longest frame [`send_raw_frame`] sends: a 1500-byte payload behind an
/// Ethernet header (no FCS), what an interface with the default MTU takes.
pub const MAX_RAW_FRAME: usize = 1514;

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |source| ProbeError::Io { op, source }
}

pub const COUNTER_REQUEST_MAGIC: &[u8; 4] = b"TWCQ";
pub const COUNTER_REPLY_MAGIC: &[u8; 4] = b"TWCR";
pub const COUNTER_REQUEST_LEN: usize = 12;
pub const COUNTER_REPLY_LEN: usize = 20;

/// A counter request datagram.
pub fn encode_counter_request(id: u64) -> [u8; COUNTER_REQUEST_LEN] {
    let mut msg = [0u8; COUNTER_REQUEST_LEN];
    msg[..4].copy_from_slice(COUNTER_REQUEST_MAGIC);
    msg[4..].copy_from_slice(&id.to_le_bytes());
    msg
}

/// `(request id, counter value)` of a counter reply datagram; `None` for
/// anything else (wrong length or magic).
pub fn decode_counter_reply(msg: &[u8]) -> Option<(u64, u64)> {
    if msg.len() != COUNTER_REPLY_LEN || &msg[..4] != COUNTER_REPLY_MAGIC {
        return None;
    }
    let id = u64::from_le_bytes(msg[4..12].try_into().ok()?);
    let value = u64::from_le_bytes(msg[12..20].try_into().ok()?);
    Some((id, value))
}

/// The time left until `deadline`, or `None` once it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// A UDP client of the `counter` guest.
#[derive(Debug)]
pub struct CounterClient {
    socket: UdpSocket,
    server: SocketAddr,
}

impl CounterClient {
    /// A client bound to `bind` (port 0 for any) that talks to `server` only:
    /// datagrams from any other address are never seen.
    pub fn new(bind: SocketAddr, server: SocketAddr) -> Result<CounterClient, ProbeError> {
        let socket = UdpSocket::bind(bind).map_err(io_err("binding the counter client"))?;
        socket
            .connect(server)
            .map_err(io_err("connecting the counter client"))?;
        Ok(CounterClient { socket, server })
    }

    /// The server this client talks to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The address the client's socket is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, ProbeError> {
        self.socket
            .local_addr()
            .map_err(io_err("reading the counter client's address"))
    }

    /// Send request `id` and wait up to `timeout` for its reply: the counter value,
    /// or `None` when no reply came in time. Replies to other ids (late replies to
    /// earlier requests, duplicates) and malformed datagrams are skipped. An ICMP
    /// port unreachable (nothing listening on the server's port) is an error.
    pub fn request(&self, id: u64, timeout: Duration) -> Result<Option<u64>, ProbeError> {
        let deadline = Instant::now() + timeout;
        self.socket
            .send(&encode_counter_request(id))
            .map_err(io_err("sending a counter request"))?;
        let mut buf = [0u8; 64];
        while let Some(left) = remaining(deadline) {
            self.socket
                .set_read_timeout(Some(left))
                .map_err(io_err("setting the receive timeout"))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    if let Some((reply_id, value)) = decode_counter_reply(&buf[..n]) {
                        if reply_id == id {
                            return Ok(Some(value));
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(ProbeError::Io {
                        op: "receiving a counter reply",
                        source: e,
                    })
                }
            }
        }
        Ok(None)
    }
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_PAYLOAD: &[u8; 16] = b"twinvm-net-probe";

/// The Internet checksum (RFC 1071) of `data`, as IPv4, ICMP and UDP use it.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = match *chunk {
            [hi, lo] => u16::from_be_bytes([hi, lo]),
            [hi] => u16::from_be_bytes([hi, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request message.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut msg = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(ICMP_ECHO_PAYLOAD);
    let sum = internet_checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    msg
}

/// Whether `packet` (an IPv4 packet as a raw ICMP socket returns it) is the echo
/// reply from `src` to our request `id`/`seq`.
fn is_echo_reply(packet: &[u8], src: Ipv4Addr, id: u16, seq: u16) -> bool {
    let Some(&version_ihl) = packet.first() else {
        return false;
    };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return false;
    }
    let (Some(from), Some(icmp)) = (packet.get(12..16), packet.get(header_len..)) else {
        return false;
    };
    icmp.len() >= 8
        && from == src.octets()
        && icmp[0] == ICMP_ECHO_REPLY
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && internet_checksum(icmp) == 0
}

/// A raw IPv4 ICMP socket in the calling thread's network namespace.
fn raw_icmp_socket() -> Result<UdpSocket, ProbeError> {
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => ProbeError::RawSocketDenied(e),
            _ => ProbeError::Io {
                op: "opening a raw ICMP socket",
                source: e,
            },
        });
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // A raw socket is a datagram socket as far as the calls used here go
    // (send_to, recv_from, read timeouts); UdpSocket gives them without unsafe.
    Ok(UdpSocket::from(owned))
}

/// Send one ICMP echo request to `dst` and wait up to `timeout` for its reply:
/// the round-trip time, or `None` when no reply came in time. Other ICMP
/// traffic the raw socket sees is skipped. Needs root (a raw socket); run it on
/// a thread inside the namespace that can reach `dst`.
pub fn icmp_ping(
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    timeout: Duration,
) -> Result<Option<Duration>, ProbeError> {
    let socket = raw_icmp_socket()?;
    let start = Instant::now();
    let deadline = start + timeout;
    socket
        .send_to(&echo_request(id, seq), SocketAddr::from((dst, 0)))
        .map_err(io_err("sending an ICMP echo request"))?;
    let mut buf = [0u8; 1500];
    while let Some(left) = remaining(deadline) {
        socket
            .set_read_timeout(Some(left))
            .map_err(io_err("setting the receive timeout"))?;
        match socket.recv(&mut buf) {
            Ok(n) if is_echo_reply(&buf[..n], dst, id, seq) => return Ok(Some(start.elapsed())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                return Err(ProbeError::Io {
                    op: "receiving an ICMP echo reply",
                    source: e,
                })
            }
        }
    }
    Ok(None)
}

/// Send `frame` (a whole Ethernet frame: destination, source, EtherType, payload;
/// no FCS) out of interface `ifname` exactly as given, through an `AF_PACKET`
/// raw socket in the calling thread's network namespace. On a TAP the frame
/// goes to whoever holds the TAP open (the guest's NIC). The interface must be
/// up. Needs root or CAP_NET_RAW.
pub fn send_raw_frame(ifname: &str, frame: &[u8]) -> Result<(), ProbeError> {
    check_interface_name(ifname)?;
    if !(ETHERNET_HEADER_LEN..=MAX_RAW_FRAME).contains(&frame.len()) {
        return Err(ProbeError::FrameLength(frame.len()));
    }
    let name = CString::new(ifname).map_err(|_| ProbeError::NoSuchInterface(ifname.into()))?;
    // SAFETY: if_nametoindex reads the NUL-terminated string `name` owns and
    // keeps no pointer to it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(ProbeError::NoSuchInterface(ifname.into()));
    }
    // Protocol 0: the socket sends only and is handed no received frame.
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => ProbeError::PacketSocketDenied(e),
            _ => ProbeError::Io {
                op: "opening a packet socket",
                source: e,
            },
        });
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr = packet_address(index);
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: sendto reads `frame.len()` bytes from `frame` and
    // `size_of::<sockaddr_ll>()` bytes from `addr`, both alive for the call;
    // `socket` is an open descriptor.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(ProbeError::Io {
            op: "sending a raw frame",
            source: io::Error::last_os_error(),
        });
    }
    if sent as usize != frame.len() {
        return Err(ProbeError::ShortSend {
            ifname: ifname.into(),
            sent: sent as usize,
            len: frame.len(),
        });
    }
    Ok(())
}

/// A link-layer address for sending on interface `index` (`sll_addr` is
/// filled in by the caller).
fn packet_address(index: libc::c_uint) -> libc::sockaddr_ll {
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: 0,
        sll_ifindex: index as libc::c_int,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_messages_round_trip() {
        let req = encode_counter_request(0x0102_0304_0506_0708);
        assert_eq!(&req[..4], b"TWCQ");
        assert_eq!(&req[4..], &[8, 7, 6, 5, 4, 3, 2, 1]);

        let mut reply = Vec::from(*b"TWCR");
        reply.extend_from_slice(&7u64.to_le_bytes());
        reply.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(decode_counter_reply(&reply), Some((7, 42)));
        assert_eq!(decode_counter_reply(&reply[..19]), None);
        let mut longer = reply.clone();
        longer.push(0);
        assert_eq!(decode_counter_reply(&longer), None);
        reply[3] = b'Q';
        assert_eq!(decode_counter_reply(&reply), None);
        assert_eq!(decode_counter_reply(&[]), None);
    }

    #[test]
    fn internet_checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2, so the checksum is !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2);
        // Odd length: the last byte is padded with zero.
        assert_eq!(internet_checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn echo_replies_are_matched_by_source_id_and_seq() {
        let src = Ipv4Addr::new(10, 0, 0, 2);
        let mut reply_icmp = echo_request(0x1234, 9);
        reply_icmp[0] = ICMP_ECHO_REPLY;
        reply_icmp[2..4].copy_from_slice(&[0, 0]);
        let sum = internet_checksum(&reply_icmp);
        reply_icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        packet[12..16].copy_from_slice(&src.octets());
        packet.extend_from_slice(&reply_icmp);

        assert!(is_echo_reply(&packet, src, 0x1234, 9));
        assert!(!is_echo_reply(
            &packet,
            Ipv4Addr::new(10, 0, 0, 3),
            0x1234,
            9
        ));
        assert!(!is_echo_reply(&packet, src, 0x1235, 9));
        assert!(!is_echo_reply(&packet, src, 0x1234, 10));
        // Our own request (type 8) looped back is not a reply.
        let mut request = packet.clone();
        request[20] = ICMP_ECHO_REQUEST;
        assert!(!is_echo_reply(&request, src, 0x1234, 9));
        // A corrupted reply fails its checksum.
        let mut corrupt = packet.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        assert!(!is_echo_reply(&corrupt, src, 0x1234, 9));
        for len in 0..packet.len() - ICMP_ECHO_PAYLOAD.len() {
            assert!(
                !is_echo_reply(&packet[..len], src, 0x1234, 9),
                "cut at {len}"
            );
        }
    }
}
