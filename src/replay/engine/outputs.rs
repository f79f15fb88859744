//! What the guest produces: console bytes and transmitted frames, each
//! tagged with the landmark that produced it, so that a primary can hold it
//! until its backup has the log through that landmark (the output rule).

use std::io::{self, Write};

/// One output of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes the guest wrote to its console (COM1).
    Console(Vec<u8>),
    /// An Ethernet frame the guest transmitted.
    Net(Vec<u8>),
}

impl Output {
    /// Bytes it occupies while held.
    pub fn len(&self) -> usize {
        match self {
            Output::Console(b) | Output::Net(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the engine's outputs go.
pub trait OutputSink: Send {
    /// An output the guest produced at `landmark`. May block while the sink
    /// is full (a primary whose backup lags): the guest then waits.
    fn emit(&mut self, landmark: u64, output: Output) -> io::Result<()>;
    /// Push out anything buffered (at the end of a run).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends a transmitted frame on (to a TAP device).
pub type FrameSender = Box<dyn FnMut(&[u8]) + Send>;

/// Outputs straight to the world: the console to a writer, frames to a
/// sender (a TAP device), or frames dropped (a replay checks them against
/// the log and sends nothing).
pub struct ConsoleAndNet {
    pub console: Box<dyn Write + Send>,
    pub net: Option<FrameSender>,
}

impl OutputSink for ConsoleAndNet {
    fn emit(&mut self, _landmark: u64, output: Output) -> io::Result<()> {
        match output {
            Output::Console(bytes) => {
                self.console.write_all(&bytes)?;
                // A console is read as it happens (a terminal, a test
                // waiting for a line): do not sit on it.
                self.console.flush()
            }
            Output::Net(frame) => {
                if let Some(send) = &mut self.net {
                    send(&frame);
                }
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.console.flush()
    }
}
