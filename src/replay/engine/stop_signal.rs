//! Ctrl-C and SIGTERM stop a running engine cleanly (it ends on a landmark,
//! so a recording gets its final digest and End record).

use std::thread;

use crossbeam_channel::Sender;

use super::Control;
use crate::vmm::Kicker;

/// Stop the VM cleanly on SIGINT/SIGTERM.
pub struct StopOnSignal {
    handle: signal_hook::iterator::Handle,
    thread: Option<thread::JoinHandle<()>>,
}

impl StopOnSignal {
    pub fn install(tx: Sender<Control>, kicker: Kicker) -> std::io::Result<Self> {
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])?;
        let handle = signals.handle();
        let thread = thread::Builder::new()
            .name("twinvm-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = tx.try_send(Control::Stop);
                    kicker.kick();
                }
            })?;
        Ok(StopOnSignal {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
