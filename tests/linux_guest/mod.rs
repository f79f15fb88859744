//! Debian's cloud kernel with the busybox initramfs of
//! guest-images/linux/build.sh, for tests/linux_boot.rs and
//! benches/linux_tcp.rs: the image (built once per process), the twinvm
//! arguments that boot it, and the networked mode's host side (a network
//! namespace with the TAP, and TCP clients for the guest's services).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use twinvm::net::netns::cleanup_stale;
use twinvm::net::NetNs;

/// The guest's address, as /init takes it from `twinvm.ip=`.
pub const GUEST_CIDR: &str = "10.77.0.2/24";
pub const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
/// The host end of the TAP.
pub const HOST_CIDR: &str = "10.77.0.1/24";
/// The TAP inside the namespace.
pub const TAP: &str = "tw0";
/// The guest's services (guest-images/linux/init).
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;
pub const DISCARD_PORT: u16 = 9;
pub const SOURCE_PORT: u16 = 19;
pub const STOP_PORT: u16 = 9999;
/// The line of the guest's web page a client checks for.
pub const HTTP_MARKER: &str = "TWINVM-HTTP-OK";

/// How long one boot, recording or replay may take (`TWINVM_LINUX_TIMEOUT`
/// seconds, default 2400).
pub fn timeout() -> Duration {
    Duration::from_secs(
        std::env::var("TWINVM_LINUX_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2400),
    )
}

/// The image directory, built once per process.
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(build_image)
}

/// Build (or reuse) the image with guest-images/linux/build.sh into
/// `TWINVM_LINUX_IMAGE_DIR` (default target/tmp/linux-image) and return
/// its directory.
fn build_image() -> PathBuf {
    let dir = std::env::var_os("TWINVM_LINUX_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-image"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest-images/linux/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .status()
        .expect("run guest-images/linux/build.sh");
    assert!(status.success(), "{} failed: {status}", script.display());
    dir
}

/// `--kernel`, `--initrd`, `--cmdline` (the image's, then `extra_cmdline`)
/// and `--mem` for the image.
pub fn guest_args(extra_cmdline: &str) -> Vec<String> {
    let dir = image();
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).expect("read OUTDIR/cmdline");
    let mut cmdline = cmdline.trim().to_string();
    if !extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra_cmdline);
    }
    vec![
        "--kernel".into(),
        dir.join("vmlinux").to_str().unwrap().into(),
        "--initrd".into(),
        dir.join("initrd.img").to_str().unwrap().into(),
        "--cmdline".into(),
        cmdline,
        "--mem".into(),
        "512M".into(),
    ]
}

/// The image's kernel, initrd and command line (with `extra_cmdline`) as
/// separate strings, for the FT pair's guest settings.
pub fn image_parts(extra_cmdline: &str) -> (String, String, String) {
    let args = guest_args(extra_cmdline);
    (args[1].clone(), args[3].clone(), args[5].clone())
}

/// `cmd` run with its CPU affinity set to `cpu` (taskset): twinvm pins its
/// vCPU thread to the host CPU it starts on, so two guests started this way
/// on different CPUs do not share one.
pub fn pinned(cmd: Command, cpu: u32) -> Command {
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", &cpu.to_string()])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    pinned
}

/// The command-line options of the networked mode: the guest's address and
/// a bound on the serving (guest seconds) in case no stop request comes.
pub fn net_cmdline(serve_secs: u64) -> String {
    format!("twinvm.ip={GUEST_CIDR} twinvm.serve={serve_secs}")
}

/// The last 40 lines of `s`, for failure messages.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The number after `key` in `console` (`key` included, e.g. `"bin="`).
pub fn number_after(console: &str, key: &str) -> Option<u64> {
    console
        .split(key)
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

const NETNS_PREFIX: &str = "twinvm-linux";
/// How long a client waits for the guest: connecting (the services may
/// still be starting), and each read (guest kernel code is slow here).
const GUEST_WAIT: Duration = Duration::from_secs(180);

/// The host side of the guest's network: a namespace (deleted on drop)
/// holding a persistent TAP with the host's address, which twinvm attaches
/// to with `--net tap=`[`TAP`].
pub struct GuestNet {
    pub ns: NetNs,
}

impl GuestNet {
    pub fn create() -> GuestNet {
        cleanup_stale(NETNS_PREFIX).expect("cleaning up namespaces of earlier runs");
        let ns = NetNs::create(NETNS_PREFIX).expect("creating a network namespace (needs root)");
        // IPv4 only on the host side too: no router solicitations or MLD
        // reports for the guest to receive (and the log to carry).
        ns.run(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])
        .expect("disabling IPv6 in the namespace");
        ns.add_tap(TAP).expect("adding the TAP");
        ns.addr_add(TAP, HOST_CIDR).expect("addressing the TAP");
        GuestNet { ns }
    }

    /// `twinvm ARGS` to run inside the namespace.
    pub fn twinvm(&self, args: &[String]) -> Command {
        let mut cmd = self.ns.command(env!("CARGO_BIN_EXE_twinvm"));
        cmd.args(args);
        cmd
    }

    /// A TCP connection from the namespace to the guest's `port` (see
    /// [`connect_from`]).
    pub fn connect(&self, port: u16) -> TcpStream {
        connect_from(&self.ns, port)
    }

    /// `GET path` from the guest's web server: the whole response.
    pub fn http_get(&self, path: &str) -> String {
        let mut stream = self.connect(HTTP_PORT);
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: 10.77.0.2\r\nUser-Agent: twinvm-test\r\n\r\n"
        )
        .unwrap();
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .expect("reading the guest's HTTP response");
        String::from_utf8_lossy(&response).into_owned()
    }

    /// Send each line to the echo service on one connection, waiting for its
    /// echo before sending the next; returns the echoes.
    pub fn echo_lines(&self, lines: &[&str]) -> Vec<String> {
        let mut stream = self.connect(ECHO_PORT);
        let mut echoes = Vec::new();
        for line in lines {
            echoes.push(echo_line(&mut stream, line));
        }
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("the echo service's end");
        assert!(rest.is_empty(), "echo sent more: {rest:?}");
        echoes
    }

    /// Send `data` to the discard service and wait for its byte count;
    /// returns that count and the time from connecting to the answer.
    pub fn discard(&self, data: &[u8]) -> (u64, Duration) {
        let started = Instant::now();
        let mut stream = self.connect(DISCARD_PORT);
        stream
            .write_all(data)
            .expect("sending to the discard service");
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("the discard service's byte count");
        let elapsed = started.elapsed();
        let count = answer
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the discard service answered {answer:?}"));
        (count, elapsed)
    }

    /// Everything the source service sends (the guest's /bin/busybox) and
    /// the time from connecting to its end.
    pub fn source(&self) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut stream = self.connect(SOURCE_PORT);
        let mut data = Vec::new();
        stream
            .read_to_end(&mut data)
            .expect("reading the source service");
        (data, started.elapsed())
    }

    /// Ask the guest to stop serving (see [`stop_from`]).
    pub fn stop(&self) -> String {
        stop_from(&self.ns)
    }
}

/// A TCP connection from namespace `ns` to the guest's `port`, retried
/// while refused (a service not listening yet) for up to [`GUEST_WAIT`].
pub fn connect_from(ns: &NetNs, port: u16) -> TcpStream {
    let addr = SocketAddr::from((GUEST_IP, port));
    let deadline = Instant::now() + GUEST_WAIT;
    let stream = ns
        .enter_on_thread(|| loop {
            match TcpStream::connect_timeout(&addr, GUEST_WAIT) {
                Ok(stream) => break stream,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    thread::sleep(Duration::from_secs(1))
                }
                Err(e) => panic!("connecting to the guest's {addr}: {e}"),
            }
        })
        .expect("entering the namespace");
    stream.set_read_timeout(Some(GUEST_WAIT)).unwrap();
    stream.set_write_timeout(Some(GUEST_WAIT)).unwrap();
    stream
}

/// Ask the guest to stop serving, from namespace `ns` (it then runs its
/// workload and powers off); returns what the stop service answered.
pub fn stop_from(ns: &NetNs) -> String {
    let mut stream = connect_from(ns, STOP_PORT);
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("the stop service's answer");
    answer
}

/// Send `line` on an open echo connection and return its echo.
pub fn echo_line(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    read_line(stream)
}

/// One `\n`-terminated line (without it), read byte by byte.
fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => panic!("connection closed after {line:?}"),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => panic!("reading an echoed line after {line:?}: {e}"),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// `len` bytes of a fixed pseudo-random sequence (xorshift64*): data that
/// neither compresses nor depends on the run.
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
