//! The host side of the guest's network.
//!
//! - this module: the `--net tap=NAME[,mac=..]` value ([`NetSpec`]) and sans-IO
//!   Ethernet frame helpers (a gratuitous ARP for after a failover, learning the
//!   guest's IPv4 address from what it sends);
//! - [`tap`]: a TAP device and the [`TapBackend`] that moves frames between it and
//!   the VMM without the vCPU thread ever blocking on it;
//! - [`netns`]: network namespaces, bridges, veth pairs and persistent TAPs
//!   (`ip` from iproute2) for tests and local drills;
//! - [`probe`]: test clients (ICMP echo, the `counter` guest's UDP protocol).

pub mod netns;
pub mod probe;
pub mod tap;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use thiserror::Error;

pub use netns::{add_veth_pair, cleanup_stale, NetNs, NetNsError};
pub use probe::{icmp_ping, CounterClient, ProbeError};
pub use tap::{SendOutcome, Tap, TapBackend, TapError, TapStats};

/// The MAC address the guest's NIC gets when none is given. Fixed, never random:
/// the primary and the backup of a pair must present the same address.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Longest Linux interface name in bytes (IFNAMSIZ less the terminating NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

/// Ethernet header: destination, source, EtherType.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// The shortest Ethernet frame on a wire, without the FCS.
pub const MIN_FRAME_LEN: usize = 60;
/// The longest frame a TAP device passes (its length travels as 16 bits).
pub const MAX_FRAME_LEN: usize = 65535;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;

const BROADCAST_MAC: [u8; 6] = [0xff; 6];
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
/// An ARP packet for IPv4 over Ethernet: 8 bytes of header, 2 × (6 + 4) addresses.
const ARP_IPV4_LEN: usize = 28;
const IPV4_MIN_HEADER_LEN: usize = 20;

/// A name the kernel would refuse (or read differently) as a network interface name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid interface name {name:?}: {reason}")]
pub struct InterfaceNameError {
    pub name: String,
    pub reason: &'static str,
}

/// Check `name` against the kernel's rules for interface names (`dev_valid_name`),
/// and refuse `%`, which would make TUNSETIFF pick a name of its own.
pub fn check_interface_name(name: &str) -> Result<(), InterfaceNameError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_INTERFACE_NAME {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are reserved")
    } else if name.contains('/') {
        Some("it contains `/`")
    } else if name.contains(':') {
        Some("it contains `:`")
    } else if name.contains('%') {
        Some("it contains `%` (a kernel name template)")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains whitespace or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InterfaceNameError {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What was wrong with a `--net` value or a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NetSpecError {
    #[error("`{0}` is not KEY=VALUE (expected tap=NAME[,mac=52:54:00:12:34:56])")]
    NotKeyValue(String),
    #[error("unknown key `{0}` (known: tap, mac)")]
    UnknownKey(String),
    #[error("key `{0}` given twice")]
    DuplicateKey(String),
    #[error("missing tap=NAME")]
    MissingTap,
    #[error(transparent)]
    InterfaceName(#[from] InterfaceNameError),
    #[error("bad MAC address {0:?}: expected six two-digit hex bytes separated by `:`, like 52:54:00:12:34:56")]
    MacSyntax(String),
    #[error("MAC address {0} is a multicast address (lowest bit of the first byte set); a NIC needs a unicast one")]
    MacMulticast(String),
    #[error("MAC address 00:00:00:00:00:00 is not a usable station address")]
    MacZero,
}

/// The guest NIC's host side: which TAP and which MAC address the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: [u8; 6],
}

impl FromStr for NetSpec {
    type Err = NetSpecError;

    /// Parse `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]` (keys in any order).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for item in s.split(',') {
            let Some((key, value)) = item.split_once('=') else {
                return Err(NetSpecError::NotKeyValue(item.to_owned()));
            };
            let slot_taken = match key {
                "tap" => tap.replace(value.to_owned()).is_some(),
                "mac" => mac.replace(parse_mac(value)?).is_some(),
                _ => return Err(NetSpecError::UnknownKey(key.to_owned())),
            };
            if slot_taken {
                return Err(NetSpecError::DuplicateKey(key.to_owned()));
            }
        }
        let tap = tap.ok_or(NetSpecError::MissingTap)?;
        check_interface_name(&tap)?;
        Ok(NetSpec {
            tap,
            mac: mac.unwrap_or(DEFAULT_MAC),
        })
    }
}

impl fmt::Display for NetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tap={},mac={}", self.tap, format_mac(self.mac))
    }
}

/// Parse a unicast MAC address written `52:54:00:12:34:56` (hex digits in either case).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetSpecError> {
    let syntax = || NetSpecError::MacSyntax(s.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(syntax)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(syntax());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
    }
    if parts.next().is_some() {
        return Err(syntax());
    }
    if mac[0] & 1 != 0 {
        return Err(NetSpecError::MacMulticast(format_mac(mac)));
    }
    if mac == [0; 6] {
        return Err(NetSpecError::MacZero);
    }
    Ok(mac)
}

/// `52:54:00:12:34:56`: lower-case hex, colon-separated.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, g] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let bytes = frame.get(at..at + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn ipv4_at(frame: &[u8], at: usize) -> Option<[u8; 4]> {
    frame.get(at..at + 4)?.try_into().ok()
}

/// The EtherType of an untagged Ethernet frame.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    be16(frame, 12)
}

/// A broadcast ARP announcement (RFC 5227: a request whose sender and target
/// protocol addresses are both `ip`) from `mac`, padded to the minimum frame
/// length. After a failover the new primary sends it so that switches learn the
/// guest's MAC on the new port and neighbours refresh their ARP caches.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(MIN_FRAME_LEN);
    frame.extend_from_slice(&BROADCAST_MAC);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame.push(6); // hardware address length
    frame.push(4); // protocol address length
    frame.extend_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&mac); // sender hardware address
    frame.extend_from_slice(&ip); // sender protocol address
    frame.extend_from_slice(&[0; 6]); // target hardware address: unknown
    frame.extend_from_slice(&ip); // target protocol address
    frame.resize(MIN_FRAME_LEN, 0);
    frame
}

/// The IPv4 address a frame's sender claims: the sender protocol address of an
/// ARP packet (IPv4 over Ethernet) or the source address of an IPv4 packet.
/// `None` for anything else, for truncated or malformed frames, and for addresses
/// that cannot be a station's own (0.0.0.0 as in DHCP and ARP probes, multicast,
/// broadcast). Only untagged frames are read (no 802.1Q).
pub fn ipv4_source(frame: &[u8]) -> Option<[u8; 4]> {
    let payload = frame.get(ETHERNET_HEADER_LEN..)?;
    let ip = match ethertype(frame)? {
        ETHERTYPE_ARP => {
            if payload.len() < ARP_IPV4_LEN
                || be16(payload, 0)? != ARP_HTYPE_ETHERNET
                || be16(payload, 2)? != ETHERTYPE_IPV4
                || payload[4] != 6
                || payload[5] != 4
            {
                return None;
            }
            ipv4_at(payload, 14)?
        }
        ETHERTYPE_IPV4 => {
            let version_ihl = *payload.first()?;
            let header_len = usize::from(version_ihl & 0x0f) * 4;
            if version_ihl >> 4 != 4
                || header_len < IPV4_MIN_HEADER_LEN
                || payload.len() < header_len
            {
                return None;
            }
            ipv4_at(payload, 12)?
        }
        _ => return None,
    };
    let addr = Ipv4Addr::from(ip);
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return None;
    }
    Some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_spec_takes_tap_alone_with_the_default_mac() {
        let spec: NetSpec = "tap=tap0".parse().unwrap();
        assert_eq!(
            spec,
            NetSpec {
                tap: "tap0".into(),
                mac: DEFAULT_MAC
            }
        );
        assert_eq!(spec.to_string(), "tap=tap0,mac=52:54:00:12:34:56");
    }

    #[test]
    fn net_spec_keys_come_in_any_order() {
        let a: NetSpec = "tap=t1,mac=02:AB:cd:00:00:01".parse().unwrap();
        let b: NetSpec = "mac=02:ab:cd:00:00:01,tap=t1".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.mac, [0x02, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(a.to_string().parse::<NetSpec>().unwrap(), a);
    }

    #[test]
    fn net_spec_errors_name_the_problem() {
        let err = |s: &str| s.parse::<NetSpec>().unwrap_err();
        assert_eq!(
            err("tap=a,speed=10"),
            NetSpecError::UnknownKey("speed".into())
        );
        assert_eq!(err("tap=a,tap=b"), NetSpecError::DuplicateKey("tap".into()));
        assert_eq!(
            err("tap=a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02"),
            NetSpecError::DuplicateKey("mac".into())
        );
        assert_eq!(err("mac=02:00:00:00:00:01"), NetSpecError::MissingTap);
        assert_eq!(err(""), NetSpecError::NotKeyValue("".into()));
        assert_eq!(err("tap0"), NetSpecError::NotKeyValue("tap0".into()));
        assert_eq!(err("tap=a,"), NetSpecError::NotKeyValue("".into()));
        assert!(matches!(err("tap="), NetSpecError::InterfaceName(_)));
        assert!(matches!(
            err("tap=a,mac=01:00:5e:00:00:01"),
            NetSpecError::MacMulticast(_)
        ));
        assert!(err("tap=a,speed=10").to_string().contains("speed"));
        assert!(err("tap=a,mac=zz").to_string().contains("zz"));
    }

    #[test]
    fn bad_macs_are_refused() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52:54:00:12:34:+5",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:56:",
        ] {
            assert_eq!(
                parse_mac(bad),
                Err(NetSpecError::MacSyntax(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(parse_mac("00:00:00:00:00:00"), Err(NetSpecError::MacZero));
        assert_eq!(
            parse_mac("ff:ff:ff:ff:ff:ff"),
            Err(NetSpecError::MacMulticast("ff:ff:ff:ff:ff:ff".into()))
        );
        assert_eq!(parse_mac("52:54:00:12:34:56"), Ok(DEFAULT_MAC));
    }

    #[test]
    fn format_mac_is_lower_case_hex() {
        assert_eq!(
            format_mac([0xde, 0xad, 0, 0xbe, 0xef, 0x0a]),
            "de:ad:00:be:ef:0a"
        );
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for good in ["tap0", "a", "twinvm-tap-1234", "x.y_z-0"] {
            assert_eq!(check_interface_name(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "0123456789abcdef",
            ".",
            "..",
            "a/b",
            "a b",
            "a\tb",
            "eth0:1",
            "tap%d",
            "a\0b",
        ] {
            let err = check_interface_name(bad).unwrap_err();
            assert_eq!(err.name, bad);
            assert!(err.to_string().contains("invalid interface name"), "{err}");
        }
        // 15 bytes is the limit, counted in bytes, not characters.
        assert!(check_interface_name("0123456789abcde").is_ok());
        assert!(check_interface_name("ééééééé").is_ok());
        assert!(check_interface_name("éééééééé").is_err());
    }

    #[test]
    fn gratuitous_arp_is_a_broadcast_announcement() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let frame = gratuitous_arp(mac, [10, 0, 0, 7]);
        assert_eq!(frame.len(), MIN_FRAME_LEN);
        assert_eq!(&frame[0..6], &[0xff; 6]);
        assert_eq!(&frame[6..12], &mac);
        assert_eq!(ethertype(&frame), Some(ETHERTYPE_ARP));
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&frame[22..28], &mac);
        assert_eq!(&frame[28..32], &[10, 0, 0, 7]);
        assert_eq!(&frame[32..38], &[0; 6]);
        assert_eq!(&frame[38..42], &[10, 0, 0, 7]);
        assert!(frame[42..].iter().all(|&b| b == 0));
        assert_eq!(ipv4_source(&frame), Some([10, 0, 0, 7]));
    }

    fn ipv4_frame(src: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 12..14 + 16].copy_from_slice(&src);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
        f
    }

    #[test]
    fn ipv4_source_reads_ipv4_packets() {
        assert_eq!(ipv4_source(&ipv4_frame([10, 0, 0, 2])), Some([10, 0, 0, 2]));
        // With options (IHL 6) the header is longer but the source stays put.
        let mut with_options = ipv4_frame([192, 168, 1, 9]);
        with_options[14] = 0x46;
        assert_eq!(ipv4_source(&with_options), Some([192, 168, 1, 9]));
    }

    #[test]
    fn ipv4_source_refuses_what_is_not_a_station_address() {
        for src in [[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1]] {
            assert_eq!(ipv4_source(&ipv4_frame(src)), None, "{src:?}");
            assert_eq!(ipv4_source(&gratuitous_arp(DEFAULT_MAC, src)), None);
        }
    }

    #[test]
    fn ipv4_source_survives_truncation_and_garbage() {
        let arp = gratuitous_arp(DEFAULT_MAC, [10, 1, 2, 3]);
        let ip = ipv4_frame([10, 1, 2, 4]);
        // Every prefix too short to hold the whole header gives None, never a panic.
        for len in 0..14 + ARP_IPV4_LEN {
            assert_eq!(ipv4_source(&arp[..len]), None, "ARP cut at {len}");
        }
        for len in 0..14 + 20 {
            assert_eq!(ipv4_source(&ip[..len]), None, "IPv4 cut at {len}");
        }
        let mut bad = ip.clone();
        bad[14] = 0x65; // version 6 in an IPv4 EtherType
        assert_eq!(ipv4_source(&bad), None);
        bad[14] = 0x44; // IHL below 5
        assert_eq!(ipv4_source(&bad), None);
        bad[14] = 0x4f; // IHL 15: 60 bytes of header, more than the frame holds
        assert_eq!(ipv4_source(&bad), None);
        let mut wrong_arp = arp.clone();
        wrong_arp[18] = 8; // hardware address length 8
        assert_eq!(ipv4_source(&wrong_arp), None);
        let mut vlan = ip.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(ipv4_source(&vlan), None);
        // A pseudo-random byte soup never panics.
        let mut x: u32 = 0x1234_5678;
        for len in 0..200 {
            let soup: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = ipv4_source(&soup);
        }
    }
}
