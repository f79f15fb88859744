//! The local drill's network: two hosts, a client and the arbiter on one
//! bridged LAN, and a dedicated logging link between the hosts — all network
//! namespaces of this machine, made by the drill and deleted when dropped.
//!
//! ```text
//!                         lan (bridge br0)
//!       ┌──────────────┬─────────┴────────┬──────────────────┐
//!    client         hostA               hostB               arb
//!  10.77.0.100   br0: lan0+tap0      br0: lan0+tap0     10.77.0.21-23
//!                10.77.0.11          10.77.0.12         (3 arbiter nodes, :7000)
//!                ft0 192.168.77.1 ── ft0 192.168.77.2   (the logging link)
//! ```
//!
//! The guest (10.77.0.2, one MAC) sits behind `tap0` on both hosts; only the
//! live side's VMM has its TAP open and sends. A partition takes the logging
//! link down while the LAN, and so the arbiter, stays reachable from both.

use std::net::Ipv4Addr;

use tracing::{debug, warn};

use super::DrillError;
use crate::net::netns::{self, add_veth_pair, NetNs};

/// The addresses of the drill's network.
pub mod addr {
    use std::net::Ipv4Addr;

    pub const LAN_PREFIX: u8 = 24;
    pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    pub const GUEST_PORT: u16 = 7777;
    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
    pub const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
    pub const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
    pub const ARBITERS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(10, 77, 0, 21),
        Ipv4Addr::new(10, 77, 0, 22),
        Ipv4Addr::new(10, 77, 0, 23),
    ];
    pub const ARBITER_PORT: u16 = 7000;
    pub const FT_PREFIX: u8 = 30;
    pub const FT_A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
    pub const FT_B: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
    pub const FT_PORT: u16 = 7300;
}

/// Interface names inside the namespaces.
pub const BRIDGE: &str = "br0";
pub const TAP: &str = "tap0";
pub const LAN_PORT: &str = "lan0";
pub const FT_LINK: &str = "ft0";
const CLIENT_IF: &str = "eth0";
const ARB_IF: &str = "eth0";

/// One of the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

impl Host {
    /// The node name the pair runs with (`--node`), as the arbiter records it.
    pub fn node(self) -> &'static str {
        match self {
            Host::A => "hostA",
            Host::B => "hostB",
        }
    }

    pub fn lan_addr(self) -> Ipv4Addr {
        match self {
            Host::A => addr::HOST_A,
            Host::B => addr::HOST_B,
        }
    }

    pub fn ft_addr(self) -> Ipv4Addr {
        match self {
            Host::A => addr::FT_A,
            Host::B => addr::FT_B,
        }
    }
}

/// The namespaces of one drill. Fields drop in order: every namespace is
/// deleted (with its interfaces) when the topology is dropped.
#[derive(Debug)]
pub struct Topology {
    pub client: NetNs,
    pub host_a: NetNs,
    pub host_b: NetNs,
    pub arb: NetNs,
    pub lan: NetNs,
}

fn cidr(ip: Ipv4Addr, prefix: u8) -> String {
    format!("{ip}/{prefix}")
}

impl Topology {
    /// Build the whole network (namespaces named `PREFIX-PID-N`).
    pub fn build(prefix: &str) -> Result<Topology, DrillError> {
        let t = Topology {
            lan: NetNs::create(prefix)?,
            client: NetNs::create(prefix)?,
            host_a: NetNs::create(prefix)?,
            host_b: NetNs::create(prefix)?,
            arb: NetNs::create(prefix)?,
        };
        t.lan.add_bridge(BRIDGE)?;

        add_veth_pair(&t.client, CLIENT_IF, &t.lan, "to-client")?;
        t.lan.set_master("to-client", BRIDGE)?;
        t.client
            .addr_add(CLIENT_IF, &cidr(addr::CLIENT, addr::LAN_PREFIX))?;

        add_veth_pair(&t.arb, ARB_IF, &t.lan, "to-arb")?;
        t.lan.set_master("to-arb", BRIDGE)?;
        for ip in addr::ARBITERS {
            t.arb.addr_add(ARB_IF, &cidr(ip, addr::LAN_PREFIX))?;
        }

        for host in [Host::A, Host::B] {
            let ns = t.host(host);
            let lan_side = format!("to-{}", host.node());
            add_veth_pair(ns, LAN_PORT, &t.lan, &lan_side)?;
            t.lan.set_master(&lan_side, BRIDGE)?;
            ns.add_bridge(BRIDGE)?;
            ns.set_master(LAN_PORT, BRIDGE)?;
            // Persistent, so the VMM attaches to it (and the backup only when
            // it goes live); bridged with the LAN port like a host's uplink.
            ns.add_tap(TAP)?;
            ns.set_master(TAP, BRIDGE)?;
            ns.addr_add(BRIDGE, &cidr(host.lan_addr(), addr::LAN_PREFIX))?;
        }

        add_veth_pair(&t.host_a, FT_LINK, &t.host_b, FT_LINK)?;
        for host in [Host::A, Host::B] {
            t.host(host)
                .addr_add(FT_LINK, &cidr(host.ft_addr(), addr::FT_PREFIX))?;
        }
        debug!(
            lan = t.lan.name(),
            client = t.client.name(),
            host_a = t.host_a.name(),
            host_b = t.host_b.name(),
            arb = t.arb.name(),
            "drill topology up"
        );
        Ok(t)
    }

    pub fn host(&self, host: Host) -> &NetNs {
        match host {
            Host::A => &self.host_a,
            Host::B => &self.host_b,
        }
    }

    /// The arbiter nodes' addresses, `ip:port` each.
    pub fn arbiter_addrs() -> Vec<String> {
        addr::ARBITERS
            .iter()
            .map(|ip| format!("{ip}:{}", addr::ARBITER_PORT))
            .collect()
    }

    /// Cut the logging link (the partition drill): hostA's end goes down,
    /// so both ends lose carrier, as when its cable is pulled.
    pub fn cut_logging_link(&self) -> Result<(), DrillError> {
        self.host_a
            .ip(["link", "set", "dev", FT_LINK, "down"])
            .map_err(DrillError::from)
            .map(drop)
    }

    /// The namespaces' names, for messages and logs.
    pub fn describe(&self) -> String {
        format!(
            "lan {}, client {}, hostA {}, hostB {}, arbiter {}",
            self.lan.name(),
            self.client.name(),
            self.host_a.name(),
            self.host_b.name(),
            self.arb.name()
        )
    }
}

impl Drop for Topology {
    /// Kill whatever still runs inside the namespaces before they go (the
    /// fields drop after this): deleting a namespace only unnames it, and a
    /// process left inside — a grandchild the drill never knew — would run on
    /// unseen.
    fn drop(&mut self) {
        for ns in [
            &self.client,
            &self.host_a,
            &self.host_b,
            &self.arb,
            &self.lan,
        ] {
            kill_processes_in(ns.name());
        }
    }
}

/// SIGKILL every process in namespace `name` (never this process).
fn kill_processes_in(name: &str) {
    let pids = match netns::pids_in(name) {
        Ok(pids) => pids,
        Err(e) => {
            warn!(netns = name, error = %e, "cannot list the processes in a drill namespace");
            return;
        }
    };
    for pid in pids.into_iter().filter(|&p| p != std::process::id()) {
        debug!(
            netns = name,
            pid, "killing a process left in a drill namespace"
        );
        // SAFETY: kill(2) takes no pointers. The PID was just listed in a
        // namespace only drills use.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            warn!(netns = name, pid, error = %std::io::Error::last_os_error(), "cannot kill a leftover process");
        }
    }
}

/// Remove what drills killed before their teardown left behind: namespaces
/// named with `prefix` whose creating process is gone, after SIGKILLing every
/// process still inside them (a namespace lives on while a process is in
/// it, and an orphaned VMM or arbiter would keep running). Returns the
/// namespaces removed.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, DrillError> {
    for name in netns::stale_names(prefix)? {
        kill_processes_in(&name);
    }
    Ok(netns::cleanup_stale(prefix)?)
}
