//! How the engine is reached from outside: the control messages and input
//! channels it takes, and the output sink and kicker it is given.

use crossbeam_channel::{Receiver, Sender};

use super::clone::CloneRequest;
use super::outputs::OutputSink;
use crate::replay::digest::DirtyPages;
use crate::vmm::sys::Kicker;

/// Messages to a running engine (besides the input channels).
pub enum Control {
    /// Stop the VM (Ctrl-C, a lost arbitration, the caller is done).
    Stop,
    /// Something arrived on an input channel: look at the inputs.
    Wake,
    /// A recording primary lost its backup and won the arbiter: stop
    /// logging and run on alone.
    DropLog,
    /// A live VM being cloned: track the pages the guest writes (or stop).
    TrackDirty(bool),
    /// A live VM being cloned: the pages written since the last ask.
    CollectDirty(Sender<Result<DirtyPages, String>>),
    /// A live VM being cloned: at the next landmark, take the snapshot a
    /// new backup resumes from and record from there (clone.rs).
    CloneAt(Box<CloneRequest>),
}

/// What reaches a running engine from outside. Every channel is bounded by
/// its creator; the engine takes serial input only as fast as the UART
/// drains it, and frames only as fast as the guest posts receive buffers.
pub struct Inputs {
    pub control: Receiver<Control>,
    /// Bytes typed at the console (live roles).
    pub serial: Option<Receiver<Vec<u8>>>,
    /// Ethernet frames received for the guest's NIC (live roles).
    pub net: Option<Receiver<Vec<u8>>>,
}

/// How the engine is connected to the rest of the process.
pub struct Connections {
    pub inputs: Inputs,
    pub outputs: Box<dyn OutputSink>,
    /// Kicks the engine's vCPU thread out of the guest; whoever feeds
    /// `inputs` holds a clone.
    pub kicker: Kicker,
}
