//! Network namespaces for tests and local drills, made with `ip` (iproute2).
//!
//! A [`NetNs`] is created with a unique name (`PREFIX-PID-N`) and deleted when
//! dropped, which removes every interface in it. Links are made with `ip -n NAME`;
//! programs run in it with `ip netns exec`; code of this process runs in it on a
//! thread that has joined it ([`NetNs::enter_on_thread`]), so sockets and TAP
//! devices made there belong to the namespace. [`cleanup_stale`] deletes
//! namespaces left by processes that were killed before they could drop theirs.
//!
//! All of it needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;
use tracing::{debug, warn};

const IP: &str = "ip";
/// Where iproute2 keeps the bind mounts that name namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Why a namespace operation failed.
#[derive(Debug, Error)]
pub enum NetNsError {
    #[error("invalid namespace prefix {prefix:?}: use 1 to 32 letters, digits, `-` or `_`")]
    InvalidPrefix { prefix: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("entering network namespace {name}: {op}: {source}")]
    Enter {
        name: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("cannot start a thread in network namespace {name}: {source}")]
    Thread { name: String, source: io::Error },
}

fn check_prefix(prefix: &str) -> Result<(), NetNsError> {
    let ok = (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetNsError::InvalidPrefix {
            prefix: prefix.to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `cmd` to completion; a failure to start or a non-zero exit is an error
/// naming the command and carrying its stderr.
fn run_checked(mut cmd: Command) -> Result<Output, NetNsError> {
    let command = describe(&cmd);
    debug!(%command, "running");
    let output = cmd.output().map_err(|source| NetNsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(NetNsError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

fn ip<I, S>(args: I) -> Result<Output, NetNsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(IP);
    cmd.args(args);
    run_checked(cmd)
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create a namespace named `PREFIX-PID-N` (unique within this process and,
    /// through the PID, among running processes) with its loopback up.
    pub fn create(prefix: &str) -> Result<NetNs, NetNsError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        check_prefix(prefix)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        ip(["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.link_up("lo")?;
        debug!(netns = %ns.name, "created network namespace");
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`: an `ip` command acting inside this namespace.
    pub fn ip<I, S>(&self, args: I) -> Result<Output, NetNsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(IP);
        cmd.arg("-n").arg(&self.name).args(args);
        run_checked(cmd)
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`);
    /// add arguments and run it as any [`Command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(IP);
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Run `args[0]` with the rest as its arguments inside this namespace, to
    /// completion; a non-zero exit is an error carrying its stderr.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output, NetNsError> {
        let Some((program, rest)) = args.split_first() else {
            return Err(NetNsError::Spawn {
                command: format!("ip netns exec {}", self.name),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no program given"),
            });
        };
        let mut cmd = self.command(program);
        cmd.args(rest);
        run_checked(cmd)
    }

    /// Run `f` on a new thread that has joined this namespace (setns), and return
    /// its result. Sockets and TAP devices `f` creates belong to the namespace
    /// (and keep working after `f` returns). A panic in `f` is passed on.
    pub fn enter_on_thread<F, T>(&self, f: F) -> Result<T, NetNsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("{NETNS_RUN_DIR}/{}", self.name);
        let ns_file = File::open(&path).map_err(|source| NetNsError::Enter {
            name: self.name.clone(),
            op: "opening its /run/netns entry",
            source,
        })?;
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    // SAFETY: setns takes a namespace fd, which `ns_file` owns, and
                    // changes only the calling thread (this new one, which ends
                    // after `f`); no pointers are involved.
                    let ret = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if ret < 0 {
                        return Err(NetNsError::Enter {
                            name: self.name.clone(),
                            op: "setns(CLONE_NEWNET)",
                            source: io::Error::last_os_error(),
                        });
                    }
                    drop(ns_file);
                    Ok(f())
                })
                .map_err(|source| NetNsError::Thread {
                    name: self.name.clone(),
                    source,
                })?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Add a Linux bridge `name`, brought up.
    pub fn add_bridge(&self, name: &str) -> Result<(), NetNsError> {
        self.ip(["link", "add", name, "type", "bridge"])?;
        self.link_up(name)
    }

    /// Add a persistent TAP device `name` (`ip tuntap add ... mode tap`), brought
    /// up. [`crate::net::Tap::open`] on a thread in this namespace attaches to it.
    pub fn add_tap(&self, name: &str) -> Result<(), NetNsError> {
        self.ip(["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.link_up(name)
    }

    /// Enslave interface `dev` to bridge `bridge`.
    pub fn set_master(&self, dev: &str, bridge: &str) -> Result<(), NetNsError> {
        self.ip(["link", "set", "dev", dev, "master", bridge])?;
        Ok(())
    }

    /// Give `dev` an address, such as `10.77.0.1/24`.
    pub fn addr_add(&self, dev: &str, cidr: &str) -> Result<(), NetNsError> {
        self.ip(["addr", "add", cidr, "dev", dev])?;
        Ok(())
    }

    /// Bring `dev` up.
    pub fn link_up(&self, dev: &str) -> Result<(), NetNsError> {
        self.ip(["link", "set", "dev", dev, "up"])?;
        Ok(())
    }

    /// Delete the namespace now, reporting a failure (dropping does the same
    /// but can only log it).
    pub fn delete(mut self) -> Result<(), NetNsError> {
        let name = std::mem::take(&mut self.name);
        ip(["netns", "delete", &name])?;
        Ok(())
    }
}

/// Join `ns_a` and `ns_b` with a veth pair: `name_a` in `ns_a`, `name_b` in
/// `ns_b`, both brought up.
pub fn add_veth_pair(
    ns_a: &NetNs,
    name_a: &str,
    ns_b: &NetNs,
    name_b: &str,
) -> Result<(), NetNsError> {
    ns_a.ip([
        "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", &ns_b.name,
    ])?;
    ns_a.link_up(name_a)?;
    ns_b.link_up(name_b)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return; // deleted explicitly
        }
        match ip(["netns", "delete", &self.name]) {
            Ok(_) => debug!(netns = %self.name, "deleted network namespace"),
            Err(e) => warn!(error = %e, "cannot delete network namespace"),
        }
    }
}

/// The PID in a name made by [`NetNs::create`] with `prefix`, if it is one.
fn creator_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (pid, n) = rest.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The names `ip netns list` printed (each line is `NAME` or `NAME (id: N)`).
fn namespace_names(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect()
}

/// Delete namespaces made by [`NetNs::create`] with `prefix` whose creating
/// process no longer runs (killed before it could drop them). Namespaces of
/// running processes, this one included, are left alone. Returns the names deleted.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, NetNsError> {
    check_prefix(prefix)?;
    let listing = ip(["netns", "list"])?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let mut deleted = Vec::new();
    for name in namespace_names(&listing) {
        let Some(pid) = creator_pid(name, prefix) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        ip(["netns", "delete", name])?;
        debug!(netns = name, pid, "deleted stale network namespace");
        deleted.push(name.to_owned());
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain_words() {
        for good in ["twinvm-test", "a", "x_1", &"p".repeat(32)] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "ns.1", &"p".repeat(33)] {
            let err = check_prefix(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid namespace prefix"),
                "{err}"
            );
        }
    }

    #[test]
    fn creator_pid_reads_only_our_names() {
        assert_eq!(creator_pid("tw-123-0", "tw"), Some(123));
        assert_eq!(creator_pid("tw-123-45", "tw"), Some(123));
        assert_eq!(creator_pid("tw-x-123-0", "tw"), None);
        assert_eq!(creator_pid("tw-123-", "tw"), None);
        assert_eq!(creator_pid("tw-123", "tw"), None);
        assert_eq!(creator_pid("twx-123-0", "tw"), None);
        assert_eq!(creator_pid("other", "tw"), None);
        // A longer prefix sharing ours is not ours: its leftover is not PID-N.
        assert_eq!(creator_pid("tw-net-123-0", "tw"), None);
        assert_eq!(creator_pid("tw-net-123-0", "tw-net"), Some(123));
    }

    #[test]
    fn namespace_listing_is_parsed() {
        let listing = "b-1-0 (id: 3)\na-2-1\n\n";
        assert_eq!(namespace_names(listing), ["b-1-0", "a-2-1"]);
    }

    #[test]
    fn commands_are_described_with_their_arguments() {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", "x", "link"]);
        assert_eq!(describe(&cmd), "ip -n x link");
    }
}
