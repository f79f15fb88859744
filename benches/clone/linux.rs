//! The clone benchmark's opt-in Linux rows (`TWINVM_CLONE_BENCH_LINUX=1`):
//! Debian's kernel in the networked mode (tests/linux_guest) as an FT pair
//! on the same topology, set up as tests/linux_boot.rs's pair test does
//! (both replicas on one host CPU: guest user-mode CPUID shows its APIC
//! ID), with wider heartbeat margins. Once
//! it serves, a client opens a TCP session to its echo service, the backup
//! is killed, and the primary is cloned twice: with the session idle, then
//! while the client keeps it busy (one line after another). After each
//! clone the pair must be whole 2 s later and the session must answer.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use twinvm::ft::drill::pair::GuestSpec;
use twinvm::ft::drill::topology::{self, Host};
use twinvm::ft::drill::{LocalOptions, LocalPair};

use super::linux_guest::{
    connect_from, echo_line, image_parts, net_cmdline, tail, timeout, ECHO_PORT,
};
use super::{clone_once, wait_state, Row, PREFIX};

pub const IDLE: &str = "Linux, TCP session idle";
pub const BUSY: &str = "Linux, TCP session busy";

/// The host CPU both replicas (and the clones) share: CPU 1 when there
/// are two, away from CPU 0 where most other work lands.
fn pair_cpu() -> u32 {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 {
        1
    } else {
        0
    }
}

/// Boot the Linux pair, lose its backup, clone the primary (idle, then with
/// the TCP session busy) and return the rows whose name contains `only`.
pub fn run(exe: &Path, mem: &str, only: &str, interrupted: &AtomicBool) -> Result<Vec<Row>> {
    let (kernel, initrd, cmdline) = image_parts(&net_cmdline(3600));
    let mut opts = LocalOptions::new(PathBuf::from(exe));
    opts.prefix = PREFIX.into();
    opts.guest = GuestSpec {
        kernel,
        initrd: Some(initrd),
        cmdline,
        mem: mem.into(),
        tap: topology::TAP.into(),
        host_cpu: Some(pair_cpu()),
        sync_bound_us: Some(2000),
    };
    // The pair test's 1,000 ms peer timeout gave a false failover 30 s
    // into the boot here (load average 10 on 2 cores, both replicas on
    // one): a wider margin, the pair only has to stay whole.
    opts.heartbeat_ms = Some(100);
    opts.peer_timeout_ms = Some(5000);
    opts.phases.ready_timeout = Duration::from_secs(300);

    let started = Instant::now();
    let mut lp = LocalPair::start(&opts, interrupted).context("starting the Linux pair")?;
    wait_serving(&mut lp, interrupted)?;
    println!("   serving after {:.1?}", started.elapsed());

    let mut session = connect_from(&lp.topo.client, ECHO_PORT);
    check_echo(&mut session, "before the backup's loss")?;
    let primary = lp.control(Host::A);
    lp.side("backup")
        .ok_or_else(|| anyhow!("the pair has no backup"))?
        .kill();
    wait_state(&primary, "the primary alone", |s| s.state == "alone")?;
    check_echo(&mut session, "with the primary alone")?;

    let mut rows = Vec::new();
    if IDLE.contains(only) {
        println!("== {IDLE}");
        let sample = clone_once(&mut lp, &opts, "clone-idle", 1, interrupted)?;
        check_echo(&mut session, "after the idle clone")?;
        rows.push((IDLE, vec![sample], None));
        lp.kill_node("clone-idle");
        wait_state(&primary, "the primary alone again", |s| s.state == "alone")?;
    }
    if BUSY.contains(only) {
        println!("== {BUSY}");
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            thread::spawn(move || keep_busy(session, &stop))
        };
        let sample = clone_once(&mut lp, &opts, "clone-busy", 2, interrupted);
        stop.store(true, Ordering::SeqCst);
        let (returned, lines, slowest) = busy
            .join()
            .map_err(|_| anyhow!("the busy TCP session failed (above)"))?;
        session = returned;
        let sample = sample?;
        println!(
            "   the busy session: {lines} lines echoed during the clone, the slowest in {slowest:.1?}"
        );
        check_echo(&mut session, "after the busy clone")?;
        rows.push((BUSY, vec![sample], None));
    }
    session.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    session
        .read_to_end(&mut rest)
        .context("the echo session's end")?;
    if !rest.is_empty() {
        bail!("the echo service sent more than the echoes: {rest:?}");
    }
    println!("   wall {:.1?}", started.elapsed());
    lp.stop(Duration::from_secs(2));
    Ok(rows)
}

/// Wait until the primary's console shows the guest serving, every side
/// still running.
fn wait_serving(lp: &mut LocalPair, interrupted: &AtomicBool) -> Result<()> {
    let console = lp
        .side("primary")
        .ok_or_else(|| anyhow!("the pair has no primary"))?
        .files
        .console
        .clone();
    let limit = timeout();
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("TWINVM-NET-SERVING") {
            return Ok(());
        }
        super::check_interrupted(interrupted)?;
        for role in ["primary", "backup"] {
            if let Some(side) = lp.side(role) {
                if let Some(status) = side.poll_exit() {
                    bail!(
                        "the {role} ended ({status}) before the guest served: {}",
                        side.stderr_tail(20).join("\n")
                    );
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no TWINVM-NET-SERVING on {} within {limit:?}; its tail: {}",
                console.display(),
                tail(&text)
            );
        }
        thread::sleep(Duration::from_secs(2));
    }
}

/// Three lines through the session, each echoed.
fn check_echo(session: &mut TcpStream, when: &str) -> Result<()> {
    for i in 0..3 {
        let line = format!("{when}, line {i}");
        let echo = echo_line(session, &line);
        if echo != line {
            bail!("the echo service answered {echo:?} to {line:?}");
        }
    }
    Ok(())
}

/// Echo one line after another on `session` until `stop`; returns the
/// session, the lines echoed and the slowest round trip. A wrong echo or
/// a broken session panics (the caller reports the join's failure).
fn keep_busy(mut session: TcpStream, stop: &AtomicBool) -> (TcpStream, u64, Duration) {
    let mut lines = 0u64;
    let mut slowest = Duration::ZERO;
    while !stop.load(Ordering::SeqCst) {
        let line = format!("busy line {lines}");
        let t = Instant::now();
        let echo = echo_line(&mut session, &line);
        slowest = slowest.max(t.elapsed());
        assert_eq!(echo, line, "the echo service's answer");
        lines += 1;
    }
    (session, lines, slowest)
}
