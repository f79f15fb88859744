//! Cloning a running VM into a new backup (docs/operations.md "Repairing a
//! pair by clone"): while the guest runs, the clone thread copies memory and
//! asks the engine for the pages written since (`Control::CollectDirty`);
//! then the engine stops the guest at a landmark just long enough to take
//! the rest (`Control::CloneAt`): the last dirty pages, the vCPU, the
//! devices and its own state, and from that landmark on it records for the
//! new backup, which resumes from the same snapshot and replays one epoch
//! behind.

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use super::{Engine, Recorder, Role, RunError};
use crate::devices::PlatformState;
use crate::replay::digest::DirtyPages;
use crate::replay::log::{CpuStateBytes, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

/// Version of [`CloneSnapshot`] this build writes and reads (3: the
/// platform's owed PIT ticks, and whether the cut is an interrupt-window
/// exit).
pub const CLONE_SNAPSHOT_VERSION: u32 = 3;

/// What a new backup needs, besides guest memory, to go on from the
/// primary's landmark `landmark` exactly as the primary does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSnapshot {
    pub version: u32,
    /// The landmark both replicas process next (its records are the first
    /// of the new log).
    pub landmark: u64,
    /// Guest time handed out so far (never goes back on the new backup).
    pub clock: u64,
    /// The landmark signature's running hash and last landmark's hash.
    pub signature: [u8; 32],
    pub signature_last: [u8; 16],
    /// The vCPU, with its last exit completed.
    pub cpu: CpuStateBytes,
    /// Every device.
    pub devices: PlatformState,
    /// The VMM's own state (the syscall fix's trap).
    pub vmm_state: Vec<u8>,
    /// The landmark is an interrupt-window exit (which decides whether it
    /// may ask for another: landmark.rs, `decide_interrupt_window`).
    pub at_window_exit: bool,
}

/// The engine's answer to `Control::CloneAt`: the snapshot, and the pages
/// written since the last `Control::CollectDirty` with their contents at
/// the cut (read while the guest is stopped: once the engine replies, the
/// guest runs on and writes them again).
pub struct CloneCut {
    pub snapshot: CloneSnapshot,
    pub pages: Vec<(u64, Vec<u8>)>,
    /// How long the vCPU was held at the landmark for the cut.
    pub held: std::time::Duration,
}

/// A request to take the snapshot at the next landmark and record from
/// there into `recorder`.
pub struct CloneRequest {
    pub recorder: Recorder,
    pub reply: Sender<Result<CloneCut, String>>,
}

impl Engine {
    /// Turn dirty tracking on or off while the engine runs live (the clone
    /// copies memory in rounds). A recording or replaying engine always
    /// tracks; this only changes a live one.
    pub(super) fn track_dirty(&mut self, on: bool) -> Result<(), RunError> {
        if matches!(self.role, Role::Live) {
            self.vm.set_dirty_logging(on)?;
            self.clone_tracking = on;
        }
        Ok(())
    }

    /// The pages written since the last call (or since tracking began).
    pub(super) fn collect_dirty(&mut self) -> Result<DirtyPages, RunError> {
        let mut pages = DirtyPages::default();
        self.vm.collect_dirty_pages(&mut [&mut pages])?;
        Ok(pages)
    }

    /// At a landmark with a clone pending: complete the vCPU's last exit,
    /// take the snapshot and the last dirty pages, and record from here.
    pub(super) fn take_clone_snapshot(&mut self, request: CloneRequest) -> Result<(), RunError> {
        let began = std::time::Instant::now();
        let answer = self.clone_cut();
        let result = match answer {
            Ok(mut cut) => {
                self.clone_tracking = false;
                // The new backup's shadow page tables start empty: drop
                // this side's too, so both run on from the same (empty)
                // shadow.
                self.vm.flush_shadow_for_clone();
                self.memory = None;
                self.since_digest = DirtyPages::default();
                self.since_sync = DirtyPages::default();
                self.set_role(Role::Record(request.recorder))?;
                tracing::info!(landmark = self.landmark, "recording for a cloned backup");
                cut.held = began.elapsed();
                Ok(cut)
            }
            Err(e) => Err(e.to_string()),
        };
        let _ = request.reply.send(result);
        Ok(())
    }

    fn clone_cut(&mut self) -> Result<CloneCut, RunError> {
        if !matches!(self.role, Role::Live) {
            return Err(RunError::Promote(
                "only a VM running alone can be cloned (a pair is whole already)",
            ));
        }
        // An IN, MMIO read or RDMSR exit is completed by the next KVM_RUN:
        // do it now, so the snapshot is the state both replicas resume.
        self.vm.complete_pending_exit()?;
        let mut dirty = self.collect_dirty()?;
        let mut pages = Vec::with_capacity(dirty.len());
        for gpa in dirty.take() {
            let mut page = vec![0u8; PAGE_SIZE];
            self.vm
                .mem
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|_| RunError::Promote("a dirty page is outside guest memory"))?;
            pages.push((gpa, page));
        }
        let cpu = match &self.sync_state {
            Some(cpu) => cpu.clone(),
            None => self.vm.cpu_state()?,
        };
        // Whether the guest can take an interrupt at the cut is judged from
        // this state on both sides: the new backup's `kvm_run` has never
        // been filled by a KVM_RUN (it says "no"), while this side's says
        // what the last exit left (seen: the primary injected at the cut
        // landmark, the new backup refused the record).
        self.sync_state = Some(cpu.clone());
        Ok(CloneCut {
            snapshot: CloneSnapshot {
                version: CLONE_SNAPSHOT_VERSION,
                landmark: self.landmark,
                clock: self.clock,
                signature: self.signature.running(),
                signature_last: self.signature.last(),
                cpu,
                devices: self.platform.save(),
                vmm_state: self.syscall_fix.save(),
                at_window_exit: self.at_window_exit,
            },
            pages,
            held: std::time::Duration::ZERO,
        })
    }

    /// A new backup: go on from a clone's snapshot (guest memory already
    /// holds the primary's pages, the vCPU and devices their state).
    pub fn resume_from_clone(&mut self, snapshot: &CloneSnapshot) -> Result<(), RunError> {
        if snapshot.version != CLONE_SNAPSHOT_VERSION {
            return Err(RunError::Promote(
                "the clone snapshot's version is not this build's",
            ));
        }
        self.syscall_fix.restore(&snapshot.vmm_state)?;
        self.landmark = snapshot.landmark;
        self.clock = snapshot.clock;
        self.signature
            .restore(snapshot.signature, snapshot.signature_last);
        // Judged from the snapshot's state, as the primary does at the cut
        // (this vCPU's `kvm_run` has never been filled).
        self.sync_state = Some(snapshot.cpu.clone());
        self.injected_here = false;
        self.at_window_exit = snapshot.at_window_exit;
        self.vm.flush_shadow_for_clone();
        Ok(())
    }
}
