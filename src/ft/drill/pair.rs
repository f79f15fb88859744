//! The pair's processes as the drill starts and watches them: the command
//! lines of `twinvm backup`, `twinvm primary` and (unprotected drills)
//! `twinvm run` — all in this one place, following
//! /work/notes/pair-cli-contract.md — the processes themselves (killed when
//! dropped), the stable stderr lines the drill reads, and the control
//! socket's status query.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::DrillError;

/// The guest both sides run: the same kernel, command line, memory and NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// `--kernel` (default: the embedded `counter` test guest).
    pub kernel: String,
    /// `--initrd`, if any.
    pub initrd: Option<String>,
    /// `--cmdline`.
    pub cmdline: String,
    /// `--mem`.
    pub mem: String,
    /// The TAP each side's VMM attaches to (`--net tap=NAME`).
    pub tap: String,
    /// `--host-cpu` of a pair: the host CPU both sides pin their vCPU
    /// thread to (guest user-mode CPUID shows its APIC ID). `None`: the
    /// primary's own, which the backup follows.
    pub host_cpu: Option<u32>,
    /// `--sync-bound-us` of the primary, when not the default.
    pub sync_bound_us: Option<u64>,
}

/// The pair's settings shared by both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSpec {
    pub vm: String,
    pub generation: u64,
    /// Where the backup listens for the logging channel (`--listen`), which
    /// the primary connects to (`--backup`).
    pub backup_listen: String,
    /// The pre-shared key of the logging channel and of the arbiter.
    pub key_file: PathBuf,
    /// The arbiter nodes, `host:port` each.
    pub arbiters: Vec<String>,
    /// `--heartbeat-ms` / `--peer-timeout-ms`, when not the defaults.
    pub heartbeat_ms: Option<u64>,
    pub peer_timeout_ms: Option<u64>,
}

/// Where one side keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideFiles {
    pub control: PathBuf,
    pub console: PathBuf,
    pub stderr: PathBuf,
}

impl SideFiles {
    /// The files of node `node` in `dir`.
    pub fn in_dir(dir: &Path, node: &str) -> SideFiles {
        SideFiles {
            control: dir.join(format!("{node}.sock")),
            console: dir.join(format!("{node}.console")),
            stderr: dir.join(format!("{node}.stderr")),
        }
    }
}

fn guest_args(guest: &GuestSpec, console: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--kernel".into(), guest.kernel.clone().into()];
    if let Some(initrd) = &guest.initrd {
        args.extend(["--initrd".into(), initrd.clone().into()]);
    }
    args.extend([
        "--cmdline".into(),
        guest.cmdline.clone().into(),
        "--mem".into(),
        guest.mem.clone().into(),
        "--net".into(),
        format!("tap={}", guest.tap).into(),
        "--serial".into(),
        console.into(),
    ]);
    args
}

/// The placement of a replica of `guest` (both sides of a pair).
fn replica_args(guest: &GuestSpec) -> Vec<OsString> {
    match guest.host_cpu {
        Some(cpu) => vec!["--host-cpu".into(), cpu.to_string().into()],
        None => Vec::new(),
    }
}

fn common_pair_args(pair: &PairSpec, node: &str, files: &SideFiles) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--vm".into(),
        pair.vm.clone().into(),
        "--generation".into(),
        pair.generation.to_string().into(),
        "--key-file".into(),
        pair.key_file.clone().into(),
        "--arbiter".into(),
        pair.arbiters.join(",").into(),
        "--node".into(),
        node.into(),
        "--control".into(),
        files.control.clone().into(),
    ];
    if let Some(ms) = pair.heartbeat_ms {
        args.extend(["--heartbeat-ms".into(), ms.to_string().into()]);
    }
    if let Some(ms) = pair.peer_timeout_ms {
        args.extend(["--peer-timeout-ms".into(), ms.to_string().into()]);
    }
    args
}

/// `twinvm backup ...` (without the program name).
pub fn backup_args(
    pair: &PairSpec,
    guest: &GuestSpec,
    node: &str,
    files: &SideFiles,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["backup".into()];
    args.extend(common_pair_args(pair, node, files));
    args.extend(["--listen".into(), pair.backup_listen.clone().into()]);
    args.extend(replica_args(guest));
    args.extend(guest_args(guest, &files.console));
    args
}

/// `twinvm primary ...` (without the program name).
pub fn primary_args(
    pair: &PairSpec,
    guest: &GuestSpec,
    node: &str,
    files: &SideFiles,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["primary".into()];
    args.extend(common_pair_args(pair, node, files));
    args.extend(["--backup".into(), pair.backup_listen.clone().into()]);
    args.extend(replica_args(guest));
    if let Some(us) = guest.sync_bound_us {
        args.extend(["--sync-bound-us".into(), us.to_string().into()]);
    }
    args.extend(guest_args(guest, &files.console));
    args
}

/// `twinvm run ...` of an unprotected drill: the same guest, no backup.
pub fn unprotected_args(guest: &GuestSpec, files: &SideFiles) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into()];
    args.extend(guest_args(guest, &files.console));
    args
}

/// The stable stderr prefixes of the pair (pair-cli-contract) that tell a
/// side won the arbitration and serves alone.
pub const CLAIM_LINES: [&str; 3] = [
    "twinvm primary: continuing alone",
    "twinvm backup: going live",
    "twinvm backup: live",
];
/// The stderr prefix of a side that lost the arbitration.
pub const LOST_LINE: &str = "twinvm: lost the arbitration";

/// The stderr prefixes of a side that suspected its peer (it then asks the
/// arbiter): the start of a failover.
pub const SUSPECT_LINES: [&str; 4] = [
    "twinvm primary: backup lost",
    "twinvm backup: primary lost",
    "twinvm primary: the backup diverged",
    "twinvm backup: this replica diverged",
];

/// The lines of `stderr` that say the side suspected its peer, in order.
pub fn suspicions(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| SUSPECT_LINES.iter().any(|p| l.starts_with(p)))
        .collect()
}

/// What a side's stderr says about the arbitration: (claimed the VM, lost it).
pub fn read_claims(stderr: &str) -> (bool, bool) {
    let claimed = stderr
        .lines()
        .any(|l| CLAIM_LINES.iter().any(|p| l.starts_with(p)));
    let lost = stderr.lines().any(|l| l.starts_with(LOST_LINE));
    (claimed, lost)
}

/// A `twinvm` process the drill started; SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub node: String,
    pub role: String,
    child: Child,
    pub files: SideFiles,
    exit: Option<ExitStatus>,
    killed: bool,
}

impl Proc {
    /// Start `cmd` (already set up to run in its namespace) as the process of
    /// `node`: its own process group (a Ctrl-C at the terminal reaches only
    /// the drill, which then tears down in order), stdin closed, stdout and
    /// stderr to `files.stderr`.
    pub fn spawn(
        mut cmd: Command,
        node: &str,
        role: &str,
        files: SideFiles,
    ) -> Result<Proc, DrillError> {
        let log = File::create(&files.stderr).map_err(|source| DrillError::Io {
            op: "creating a process log",
            path: files.stderr.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| DrillError::Io {
            op: "duplicating a process log",
            path: files.stderr.clone(),
            source,
        })?;
        debug!(node, role, command = ?cmd, "starting");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| DrillError::Spawn {
                what: format!("{role} on {node}"),
                source,
            })?;
        Ok(Proc {
            node: node.to_owned(),
            role: role.to_owned(),
            child,
            files,
            exit: None,
            killed: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has ended (reaped once, remembered).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    pub fn running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// SIGKILL it now (the fault itself) and reap it.
    pub fn kill(&mut self) {
        self.killed = true;
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
    }

    /// Whether the drill killed it.
    pub fn killed_by_drill(&self) -> bool {
        self.killed
    }

    /// Its exit code and ending signal, once it has ended.
    pub fn exit_code_and_signal(&mut self) -> (Option<i32>, Option<i32>) {
        match self.poll_exit() {
            Some(s) => (s.code(), s.signal()),
            None => (None, None),
        }
    }

    /// Everything it wrote to stderr (and stdout) so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.files.stderr).unwrap_or_default()
    }

    /// The last `n` lines of its stderr, for a failure report.
    pub fn stderr_tail(&self, n: usize) -> Vec<String> {
        let text = self.stderr_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| (*l).to_owned())
            .collect()
    }

    /// Ask it to stop (SIGTERM), give it `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if self.poll_exit().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) takes no pointers; `pid` is our own unreaped child,
        // so the number cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if self.poll_exit().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        warn!(node = %self.node, role = %self.role, "did not stop on SIGTERM; killing it");
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A side's status from its control socket (pair-cli-contract; fields the
/// drill does not use are kept in `extra`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    pub vm: String,
    pub generation: u64,
    pub node: String,
    pub role: String,
    pub state: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The longest status line accepted from a control socket.
const MAX_STATUS_LINE: u64 = 64 * 1024;

/// Ask the control socket at `path` for its status (`status\n` → one JSON line).
pub fn query_status(path: &Path, timeout: Duration) -> Result<PairStatus, DrillError> {
    let mut stream = connect(path)?;
    exchange_status(&mut stream, path, timeout)
}

/// [`query_status`], and the PID of the process serving the socket: the
/// peer credentials (SO_PEERCRED) the kernel recorded when it listened.
pub fn query_status_and_pid(
    path: &Path,
    timeout: Duration,
) -> Result<(PairStatus, u32), DrillError> {
    let mut stream = connect(path)?;
    let pid = peer_pid(&stream, path)?;
    Ok((exchange_status(&mut stream, path, timeout)?, pid))
}

fn connect(path: &Path) -> Result<UnixStream, DrillError> {
    UnixStream::connect(path).map_err(|source| DrillError::Io {
        op: "connecting to the control socket",
        path: path.to_owned(),
        source,
    })
}

fn exchange_status(
    stream: &mut UnixStream,
    path: &Path,
    timeout: Duration,
) -> Result<PairStatus, DrillError> {
    let io = |op: &'static str| {
        let path = path.to_owned();
        move |source| DrillError::Io { op, path, source }
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("setting a read timeout"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("setting a write timeout"))?;
    stream
        .write_all(b"status\n")
        .map_err(io("asking the control socket for its status"))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&*stream, MAX_STATUS_LINE))
        .read_line(&mut line)
        .map_err(io("reading the status"))?;
    if !line.ends_with('\n') {
        return Err(DrillError::BadStatus {
            path: path.to_owned(),
            reason: if line.is_empty() {
                "the socket closed without an answer".to_owned()
            } else {
                format!("no complete line within {MAX_STATUS_LINE} bytes")
            },
        });
    }
    serde_json::from_str(line.trim_end()).map_err(|e| DrillError::BadStatus {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn peer_pid(stream: &UnixStream, path: &Path) -> Result<u32, DrillError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes, a `ucred`, into `cred`,
    // which lives across the call; the fd is the connected socket we own.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret != 0 || cred.pid <= 0 {
        return Err(DrillError::Io {
            op: "reading the peer's PID (SO_PEERCRED) of",
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> (PairSpec, GuestSpec, SideFiles) {
        (
            PairSpec {
                vm: "drill".into(),
                generation: 1,
                backup_listen: "192.168.77.2:7300".into(),
                key_file: "/tmp/d/cluster.key".into(),
                arbiters: vec!["10.77.0.21:7000".into(), "10.77.0.22:7000".into()],
                heartbeat_ms: Some(20),
                peer_timeout_ms: None,
            },
            GuestSpec {
                kernel: "builtin:counter".into(),
                initrd: None,
                cmdline: "ip=10.77.0.2 port=7777".into(),
                mem: "64M".into(),
                tap: "tap0".into(),
                host_cpu: None,
                sync_bound_us: None,
            },
            SideFiles::in_dir(Path::new("/tmp/d"), "hostA"),
        )
    }

    fn words(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_lines_follow_the_contract() {
        let (pair, guest, files) = spec();
        let b = words(&backup_args(&pair, &guest, "hostB", &files));
        assert_eq!(
            b,
            "backup --vm drill --generation 1 --key-file /tmp/d/cluster.key \
             --arbiter 10.77.0.21:7000,10.77.0.22:7000 --node hostB --control /tmp/d/hostA.sock \
             --heartbeat-ms 20 --listen 192.168.77.2:7300 --kernel builtin:counter \
             --cmdline ip=10.77.0.2 port=7777 --mem 64M --net tap=tap0 --serial /tmp/d/hostA.console"
        );
        let p = words(&primary_args(&pair, &guest, "hostA", &files));
        assert!(p.starts_with("primary --vm drill "), "{p}");
        assert!(p.contains(" --backup 192.168.77.2:7300 "), "{p}");
        assert!(!p.contains("--listen"), "{p}");
        // The guest flags are identical on both sides.
        let guest_part = |s: &str| s[s.find("--kernel").unwrap()..].to_owned();
        assert_eq!(guest_part(&b), guest_part(&p));
        let r = words(&unprotected_args(&guest, &files));
        assert_eq!(guest_part(&r), guest_part(&p));
        assert!(r.starts_with("run --kernel"), "{r}");
    }

    #[test]
    fn stderr_lines_are_read_by_prefix() {
        assert_eq!(read_claims(""), (false, false));
        assert_eq!(
            read_claims(
                "twinvm backup: primary lost (timeout); asking the arbiter\n\
                 twinvm backup: going live at landmark 5 (arbiter: won generation 1)\n"
            ),
            (true, false)
        );
        assert_eq!(
            read_claims("twinvm primary: continuing alone (arbiter: won generation 1)\n"),
            (true, false)
        );
        assert_eq!(
            read_claims("twinvm: lost the arbitration (held by hostB): stopping\n"),
            (false, true)
        );
        // Only at the start of a line.
        assert_eq!(read_claims("note: twinvm backup: live\n"), (false, false));
    }

    #[test]
    fn suspicions_are_the_lines_that_start_a_failover() {
        let stderr = "twinvm primary: backup connected (generation 1)\n\
            WARN FT link closed reason=no valid frame from the peer for 200ms\n\
            twinvm primary: backup lost (silent for 200 ms); asking the arbiter\n\
            twinvm: lost the arbitration (held by hostB/backup): stopping\n";
        assert_eq!(
            suspicions(stderr),
            ["twinvm primary: backup lost (silent for 200 ms); asking the arbiter"]
        );
        assert_eq!(
            suspicions("twinvm backup: primary lost (connection reset); asking the arbiter\n")
                .len(),
            1
        );
        assert!(suspicions("twinvm backup: waiting for the primary on 1.2.3.4:7300\n").is_empty());
    }

    #[test]
    fn status_lines_parse_with_unknown_fields_kept() {
        let line = r#"{"vm":"demo","generation":1,"node":"hostA","role":"primary","state":"replicating","landmark":123,"hold_ms":{"p50":0.4}}"#;
        let s: PairStatus = serde_json::from_str(line).unwrap();
        assert_eq!(s.state, "replicating");
        assert_eq!(s.extra["landmark"], 123);
        assert!(serde_json::from_str::<PairStatus>(r#"{"vm":"demo"}"#).is_err());
    }

    #[test]
    fn status_query_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let answers = [
                "{\"vm\":\"v\",\"generation\":2,\"node\":\"n\",\"role\":\"backup\",\"state\":\"live\"}\n",
                "{\"vm\":\"v\",\"generation\":2,\"node\":\"n\",\"role\":\"backup\",\"state\":\"live\"}\n",
                "not json\n",
                "",
            ];
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(line, "status\n");
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let t = Duration::from_secs(2);
        let s = query_status(&path, t).unwrap();
        assert_eq!(
            (s.role.as_str(), s.state.as_str(), s.generation),
            ("backup", "live", 2)
        );
        // The server is this process.
        let (s, pid) = query_status_and_pid(&path, t).unwrap();
        assert_eq!((s.state.as_str(), pid), ("live", std::process::id()));
        let e = query_status(&path, t).unwrap_err().to_string();
        assert!(e.contains("c.sock") && e.contains("expected"), "{e}");
        let e = query_status(&path, t).unwrap_err().to_string();
        assert!(e.contains("closed without an answer"), "{e}");
        server.join().unwrap();
        let e = query_status(&dir.path().join("none.sock"), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("connecting to the control socket"), "{e}");
    }
}
