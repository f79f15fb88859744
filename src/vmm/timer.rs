//! The deadline timer: a thread that kicks the vCPU thread when the deadline
//! it was last given passes (a guest spinning in user mode makes no exits,
//! so timer interrupts and sync points need a kick).

use std::thread;
use std::time::{Duration, Instant};

use std::sync::mpsc::{RecvTimeoutError, Sender};

use super::sys::{self, Kicker};
use crate::devices::Nanos;

/// Kicks the vCPU thread whenever the deadline it was last given passes.
pub struct DeadlineTimer {
    tx: Option<Sender<Option<Instant>>>,
    thread: Option<thread::JoinHandle<()>>,
    armed: Option<Nanos>,
}

impl DeadlineTimer {
    /// Start the thread, idle. Start it before the vCPU thread pins itself
    /// to a host CPU: a thread inherits its creator's CPU mask, and a timer
    /// sharing the busy vCPU's CPU kicked about ten times less often
    /// (measured).
    pub fn start(kicker: Kicker) -> std::io::Result<Self> {
        // A std channel: crossbeam's blocking receive yields the CPU four
        // times before it parks, which costs a time slice each on a busy
        // host CPU when the real-time priority below is refused.
        let (tx, rx) = std::sync::mpsc::channel::<Option<Instant>>();
        let thread = thread::Builder::new()
            .name("twinvm-timer".into())
            .spawn(move || {
                // A kick is due when the vCPU has been busy too long, so the
                // timer must not wait for a time slice behind busy threads
                // (measured: with both host CPUs running vCPUs, kicks fell
                // about tenfold, to a handful per second for some guests).
                // It sleeps nearly all the time, so a real-time priority
                // costs the rest nothing.
                if let Err(e) = sys::make_current_thread_realtime(1) {
                    tracing::debug!("timer thread stays at normal priority: {e}");
                }
                let mut deadline: Option<Instant> = None;
                loop {
                    let msg = match deadline {
                        Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match msg {
                        Ok(d) => deadline = d,
                        Err(RecvTimeoutError::Timeout) => {
                            kicker.kick();
                            deadline = None;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(DeadlineTimer {
            tx: Some(tx),
            thread: Some(thread),
            armed: None,
        })
    }

    /// Arm for `deadline` (guest ns since `start`), unless already armed for
    /// it; None disarms.
    pub fn arm(&mut self, start: Instant, deadline: Option<Nanos>) {
        if self.armed != deadline {
            self.armed = deadline;
            if let Some(tx) = &self.tx {
                let _ = tx.send(deadline.map(|ns| start + Duration::from_nanos(ns)));
            }
        }
    }

    /// The timer fired (or may have): the next arm must be sent again.
    pub fn fired(&mut self) {
        self.armed = None;
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
