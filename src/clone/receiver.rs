//! The new backup's side of a clone (`twinvm backup --from-clone`): wait
//! for a primary on the clone channel, check that it runs the same build
//! and guest, build the VM, load the pages of every round, then the cut's
//! snapshot; the caller sets up the engine from it and confirms.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::compat::{incompatibilities, this_build, Expected, Offered};
use super::protocol::{ToClonePrimary, ToNewBackup};
use super::{CloneChannel, CloneError};
use crate::devices::Platform;
use crate::replay::engine::CloneSnapshot;
use crate::replay::log::{LogHeader, PAGE_SIZE};
use crate::vmm::vm::GuestWrite;
use crate::vmm::Vm;

/// How long the primary may stay silent during a clone.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// What this backup is for.
pub struct ReceiverExpect {
    pub vm: String,
    /// This backup's guest (boot time and host CPU are the primary's).
    pub guest: LogHeader,
}

/// The clone received: the VM holds the primary's memory, vCPU and
/// devices at the cut. Confirm (or fail) once the engine is set up.
pub struct Received {
    pub vm: Vm,
    pub platform: Platform<Vec<u8>>,
    /// The primary's log header.
    pub header: LogHeader,
    /// The pair's generation from now on.
    pub generation: u64,
    pub snapshot: CloneSnapshot,
    pub pending: PendingFinal,
    pub pages: u64,
    pub rounds: u32,
}

/// The clone channel, waiting for the caller's verdict on the snapshot.
pub struct PendingFinal {
    chan: CloneChannel,
}

impl PendingFinal {
    /// The snapshot is in place: the primary opens the logging channel.
    pub fn confirm(mut self) -> Result<(), CloneError> {
        self.chan.send(&ToClonePrimary::FinalOk.encode())
    }

    /// Tell the primary why the clone failed here.
    pub fn fail(mut self, reason: &str) {
        let _ = self.chan.send(
            &ToClonePrimary::Failed {
                reason: reason.to_owned(),
            }
            .encode(),
        );
        self.chan.shutdown();
    }
}

/// Build the VM for the primary's header.
pub type BuildVm<'a> = dyn FnMut(&LogHeader) -> Result<(Vm, Platform<Vec<u8>>), String> + 'a;

/// Wait on `listener` for a primary's clone and receive it. Connections
/// that fail the handshake (strangers, garbage) are logged and the wait
/// goes on; an incompatible primary is refused with the reason, and so is
/// this call.
pub fn receive_clone(
    listener: &TcpListener,
    key: &arbiter::auth::Key,
    expect: &ReceiverExpect,
    build: &mut BuildVm,
    stop: &AtomicBool,
) -> Result<Received, CloneError> {
    listener.set_nonblocking(true).map_err(|e| CloneError::Io {
        what: "setting the listener non-blocking",
        error: e.to_string(),
    })?;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(CloneError::Stopped);
        }
        let (stream, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                return Err(CloneError::Io {
                    what: "accepting the primary's clone connection",
                    error: e.to_string(),
                })
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        match handshake(stream, key) {
            Ok(chan) => return receive_from(chan, expect, build),
            Err(e) => {
                eprintln!("twinvm backup: refused a clone connection from {peer}: {e}");
            }
        }
    }
}

fn handshake(stream: TcpStream, key: &arbiter::auth::Key) -> Result<CloneChannel, CloneError> {
    CloneChannel::accept(stream, key, Duration::from_secs(5))
}

fn receive_from(
    mut chan: CloneChannel,
    expect: &ReceiverExpect,
    build: &mut BuildVm,
) -> Result<Received, CloneError> {
    let started = Instant::now();
    let hello = ToNewBackup::decode(&chan.recv()?)?;
    let ToNewBackup::Hello {
        protocol_version,
        vm,
        generation,
        log_header,
        build: theirs,
        host_cpu: _,
    } = hello
    else {
        return Err(CloneError::Violation(format!(
            "{} before the Hello",
            hello.name()
        )));
    };
    let header = LogHeader::decode(&log_header)
        .map_err(|e| CloneError::Violation(format!("the Hello's log header: {e}")))?;
    let ours = this_build();
    let why = incompatibilities(
        &Offered {
            protocol_version,
            vm: &vm,
            build: &theirs,
            guest: &header,
        },
        &Expected {
            vm: &expect.vm,
            build: &ours,
            guest: &expect.guest,
        },
    );
    if !why.is_empty() {
        let reason = why.join("; ");
        let _ = chan.send(
            &ToClonePrimary::Refused {
                reason: reason.clone(),
            }
            .encode(),
        );
        chan.shutdown();
        return Err(CloneError::Incompatible(reason));
    }
    let (vm_built, mut platform) = match build(&header) {
        Ok(v) => v,
        Err(e) => {
            let reason = format!("building the VM: {e}");
            let _ = chan.send(
                &ToClonePrimary::Refused {
                    reason: reason.clone(),
                }
                .encode(),
            );
            return Err(CloneError::Engine(reason));
        }
    };
    chan.send(&ToClonePrimary::HelloOk.encode())?;
    chan.set_timeout(SILENCE_LIMIT)?;
    eprintln!(
        "twinvm backup: cloning VM {vm} (generation {generation}, {} MiB)",
        header.mem_bytes >> 20
    );
    let fail = |mut chan: CloneChannel, e: CloneError| -> CloneError {
        let _ = chan.send(
            &ToClonePrimary::Failed {
                reason: e.to_string(),
            }
            .encode(),
        );
        chan.shutdown();
        e
    };
    let mut pages: u64 = 0;
    let mut rounds = 0u32;
    let mut last_round: Option<u32> = None;
    loop {
        let msg = match chan.recv().and_then(|b| Ok(ToNewBackup::decode(&b)?)) {
            Ok(m) => m,
            Err(e) => return Err(fail(chan, e)),
        };
        match msg {
            ToNewBackup::Pages { round, pages: list } => {
                if last_round.is_some_and(|r| round < r) {
                    return Err(fail(
                        chan,
                        CloneError::Violation(format!(
                            "pages of round {round} after a later round"
                        )),
                    ));
                }
                last_round = Some(round);
                for (gpa, data) in &list {
                    if gpa + PAGE_SIZE as u64 > header.mem_bytes {
                        return Err(fail(
                            chan,
                            CloneError::Violation(format!("page {gpa:#x} is outside guest memory")),
                        ));
                    }
                    if let Err(e) = vm_built.write_guest(*gpa, data, GuestWrite::SyncPoint) {
                        return Err(fail(
                            chan,
                            CloneError::Engine(format!("writing page {gpa:#x}: {e}")),
                        ));
                    }
                }
                pages += list.len() as u64;
            }
            ToNewBackup::Round { round, dirty_pages } => {
                rounds = round + 1;
                eprintln!(
                    "twinvm backup: clone round {round} done: {pages} pages so far, {dirty_pages} dirtied meanwhile ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
            }
            ToNewBackup::Final {
                snapshot,
                pages_sent,
            } => {
                if pages_sent != pages {
                    return Err(fail(
                        chan,
                        CloneError::Violation(format!(
                            "the primary sent {pages_sent} pages, {pages} arrived"
                        )),
                    ));
                }
                let snapshot: CloneSnapshot = match serde_json::from_slice(&snapshot) {
                    Ok(s) => s,
                    Err(e) => {
                        return Err(fail(
                            chan,
                            CloneError::Violation(format!("the snapshot does not parse: {e}")),
                        ))
                    }
                };
                if snapshot.version != crate::replay::engine::CLONE_SNAPSHOT_VERSION {
                    return Err(fail(
                        chan,
                        CloneError::Incompatible(format!("snapshot version {}", snapshot.version)),
                    ));
                }
                if let Err(e) = vm_built.set_cpu_state(&snapshot.cpu) {
                    return Err(fail(
                        chan,
                        CloneError::Engine(format!("the vCPU state: {e}")),
                    ));
                }
                if let Err(e) = platform.restore(&snapshot.devices) {
                    return Err(fail(
                        chan,
                        CloneError::Engine(format!("the devices' state: {e}")),
                    ));
                }
                eprintln!(
                    "twinvm backup: clone received: {pages} pages in {rounds} rounds, cut at landmark {} ({:.1} s)",
                    snapshot.landmark,
                    started.elapsed().as_secs_f64()
                );
                return Ok(Received {
                    vm: vm_built,
                    platform,
                    header,
                    generation,
                    snapshot,
                    pending: PendingFinal { chan },
                    pages,
                    rounds,
                });
            }
            ToNewBackup::Hello { .. } => {
                return Err(fail(chan, CloneError::Violation("a second Hello".into())))
            }
        }
    }
}
