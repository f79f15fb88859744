//! Sync points (the primary stops the guest anywhere and ships its state;
//! the backup loads it) and digests (both sides hash the machine; the
//! backup compares).

use std::time::Instant;

use vm_memory::Bytes;

use super::landmark::hex;
use super::{Engine, Role, RunError};
use crate::replay::digest::{self, LandmarkKind, MemoryHash};
use crate::replay::log::{
    CpuStateBytes, PageData, PageHash, Record, StateDigest, SyncPage, PAGE_SIZE,
};
use crate::vmm::layout;
use crate::vmm::vm::{GuestWrite, Vm};

/// Pages of contents the sync-point buffer keeps between sync points
/// (8 MiB; only changed pages are copied into it), so a steady recording
/// reuses it.
const MAX_KEPT_SYNC_PAGES: usize = 2048;

/// The whole-memory hash of a freshly built VM.
pub(super) fn memory_hash_of(vm: &Vm) -> MemoryHash {
    MemoryHash::new(layout::ram_pages(vm.mem_bytes), |i, buf| {
        // Pages that cannot be read count as zeros on both sides alike.
        let _ = vm.read_ram_page(i, buf);
    })
}

impl Engine {
    /// Primary: the guest was kicked at an arbitrary point; make it the next
    /// landmark (a sync point, when recording). False: the sync point does
    /// not fit under the log's size limit; nothing of it was written and
    /// the landmark is still the last one.
    pub(super) fn make_sync_point(&mut self) -> Result<bool, RunError> {
        self.landmark += 1;
        self.injected_here = false;
        self.at_window_exit = false;
        self.signature.fold(self.landmark, LandmarkKind::SyncPoint);
        let device_unflushed = self.vm.device_unflushed();
        self.vm.note_sync_point();
        tracing::trace!(landmark = self.landmark, "sync point made");
        let Role::Record(rec) = &mut self.role else {
            return Ok(true);
        };
        let started = Instant::now();
        let cpu = self.vm.cpu_state()?;
        self.vm.collect_dirty_pages(&mut [
            &mut self.since_sync,
            &mut self.since_digest,
            &mut self.since_state,
        ])?;
        // Each page is read into one reused buffer and compared with the
        // log's page cache right away; only changed pages keep their copy
        // (no allocation, zeroing and freeing of a page each, and an
        // unchanged page is read once: docs/benchmarks.md, "sync-point
        // cost").
        let gpas = self.since_sync.take();
        let mut contents = std::mem::take(&mut self.sync_pages);
        // Slot i holds the i-th changed page; the slot after the last is
        // where the next page is read.
        let mut read: Vec<(u64, Option<usize>)> = Vec::with_capacity(gpas.len());
        let mut changed = 0;
        for gpa in gpas {
            let at = changed * PAGE_SIZE;
            if contents.len() < at + PAGE_SIZE {
                contents.resize(at + PAGE_SIZE, 0);
            }
            let slot = &mut contents[at..at + PAGE_SIZE];
            if self
                .vm
                .mem
                .read_slice(slot, vm_memory::GuestAddress(gpa))
                .is_err()
            {
                continue;
            }
            if rec.log.holds_page(gpa, slot) {
                read.push((gpa, None));
            } else {
                read.push((gpa, Some(changed)));
                changed += 1;
            }
        }
        let pages: Vec<(u64, SyncPage)> = read
            .iter()
            .map(|&(gpa, slot)| {
                let page = match slot {
                    Some(i) => SyncPage::Contents(&contents[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]),
                    None => SyncPage::Unchanged,
                };
                (gpa, page)
            })
            .collect();
        let page_count = pages.len() as u64;
        let carried: Vec<u64> = read.iter().map(|&(gpa, _)| gpa).collect();
        let before = rec.log.written().0;
        let vmm_state = self.syscall_fix.save();
        tracing::trace!(landmark = self.landmark, kind = "sync-point", "log");
        let logged = rec
            .log
            .append_sync_point(self.landmark, &cpu, &vmm_state, &pages)
            .map_err(RunError::LogWrite);
        drop(pages);
        // A sync point of all of a large guest's memory does not keep its
        // buffer.
        contents.truncate(MAX_KEPT_SYNC_PAGES * PAGE_SIZE);
        contents.shrink_to(MAX_KEPT_SYNC_PAGES * PAGE_SIZE);
        self.sync_pages = contents;
        match logged {
            Err(RunError::LogWrite(e))
                if e.kind() == std::io::ErrorKind::StorageFull
                    && self.settings.max_log_bytes.is_some() =>
            {
                tracing::debug!("{e}");
                self.landmark -= 1;
                return Ok(false);
            }
            logged => logged?,
        }
        self.stats.sync_points += 1;
        self.stats.sync_point_pages += page_count;
        self.stats.sync_point_bytes += self.log_bytes_written() - before;
        self.stats.sync_point_time += started.elapsed();
        if let Role::Record(rec) = &mut self.role {
            let pages = rec.log.page_stats();
            rec.log.get_mut().page_cache(Some(&pages));
        }
        // Judge "can take an interrupt" from this state, as the backup will.
        self.sync_state = Some(cpu);
        self.log_sync_state(device_unflushed, &carried)?;
        Ok(true)
    }

    /// Backup: load the primary's sync point instead of executing to it.
    pub(super) fn apply_sync_point(&mut self, record: Record) -> Result<(), RunError> {
        // Finish the landmark's exit first, or its completion would land on
        // top of the loaded state.
        self.vm.complete_pending_exit()?;
        self.vm.settle_flush_before_sync_point();
        let (landmark, cpu, vmm_state) = self.load_sync_point_pages(record)?;
        tracing::trace!(landmark, "sync point loaded");
        self.enter_sync_point(landmark, cpu, &vmm_state)
    }

    /// Backup: load a sync point's pages and count it; its landmark, vCPU
    /// and VMM state are left to [`Engine::enter_sync_point`].
    pub(super) fn load_sync_point_pages(
        &mut self,
        record: Record,
    ) -> Result<(u64, Box<CpuStateBytes>, Vec<u8>), RunError> {
        let Record::SyncPoint {
            landmark,
            cpu,
            vmm_state,
            pages,
        } = record
        else {
            unreachable!("the schedule hands out only sync points here")
        };
        self.load_pages(&pages, "sync point")?;
        self.stats.sync_points += 1;
        Ok((landmark, cpu, vmm_state))
    }

    /// Backup, its pages loaded: make the sync point at `landmark` the
    /// current landmark, with its vCPU and VMM state, as the primary made
    /// it.
    pub(super) fn enter_sync_point(
        &mut self,
        landmark: u64,
        cpu: Box<CpuStateBytes>,
        vmm_state: &[u8],
    ) -> Result<(), RunError> {
        self.vm.set_cpu_state(&cpu)?;
        self.syscall_fix.restore(vmm_state)?;
        self.vm.note_sync_point();
        self.landmark = landmark;
        self.injected_here = false;
        self.at_window_exit = false;
        self.signature.fold(self.landmark, LandmarkKind::SyncPoint);
        self.sync_state = Some(*cpu);
        Ok(())
    }

    /// Backup: write the primary's pages of a sync point (or a sync state)
    /// into guest memory, and count them.
    pub(super) fn load_pages(
        &mut self,
        pages: &[(u64, PageData)],
        what: &str,
    ) -> Result<(), RunError> {
        for (gpa, data) in pages {
            self.vm
                .write_guest(*gpa, data, GuestWrite::SyncPoint)
                .map_err(|e| self.diverged(format!("{what} page: {e}")))?;
        }
        self.stats.sync_point_pages += pages.len() as u64;
        Ok(())
    }

    /// The whole-memory hash (made when a tracking role began).
    fn memory_hash(&mut self) -> &mut MemoryHash {
        let vm = &self.vm;
        self.memory.get_or_insert_with(|| memory_hash_of(vm))
    }

    /// Bring the whole-memory hash up to date with every page written since
    /// the last digest; returns those pages' addresses and hashes.
    fn hash_written_pages(&mut self) -> Result<Vec<PageHash>, RunError> {
        // Only a recording keeps the pages for its next sync state.
        let recording = self.role.recording();
        let mut sets = vec![&mut self.since_sync, &mut self.since_digest];
        if recording {
            sets.push(&mut self.since_state);
        }
        self.vm.collect_dirty_pages(&mut sets)?;
        let mut page = vec![0u8; PAGE_SIZE];
        let mut hashes = Vec::new();
        for gpa in self.since_digest.take() {
            let Some(index) = layout::ram_page_index(self.vm.mem_bytes, gpa) else {
                continue;
            };
            self.vm.read_ram_page(index, &mut page)?;
            let hash = self.memory_hash().update(index, &page);
            hashes.push(PageHash { gpa, hash });
        }
        Ok(hashes)
    }

    /// The machine's digest here: vCPU, devices, landmark signature, memory.
    fn current_digest(&mut self) -> Result<StateDigest, RunError> {
        let pages = self.hash_written_pages()?;
        Ok(StateDigest {
            cpu: digest::cpu_hashes(&self.vm.cpu_state()?),
            devices: digest::state_hash(&self.platform.save()),
            signature: self.signature.running(),
            memory: self.memory_hash().root(),
            pages,
        })
    }

    pub(super) fn record_digest(&mut self) -> Result<(), RunError> {
        let started = Instant::now();
        let digest = self.current_digest()?;
        self.stats.digests += 1;
        self.stats.digest_pages += digest.pages.len() as u64;
        self.stats.digest_time += started.elapsed();
        self.log(Record::Digest {
            landmark: self.landmark,
            digest: Box::new(digest),
        })
    }

    /// Backup: compare this replica with the primary's digest; name what
    /// differs.
    pub(super) fn verify_digest(&mut self, theirs: &StateDigest) -> Result<(), RunError> {
        let started = Instant::now();
        let ours = self.current_digest()?;
        self.stats.digests += 1;
        self.stats.digest_pages += theirs.pages.len() as u64;
        self.stats.digest_time += started.elapsed();
        let mut differences = Vec::new();
        let cpu = digest::differing_cpu_parts(&theirs.cpu, &ours.cpu);
        if !cpu.is_empty() {
            differences.push(format!("vCPU state differs ({})", cpu.join(", ")));
        }
        if theirs.devices != ours.devices {
            differences.push("device state differs".to_string());
        }
        if theirs.signature != ours.signature {
            differences.push(format!(
                "the landmarks since the last digest differ from the primary's (an exit of another kind, place or data; record with --trace-landmarks to find it; signature {} here, {} there)",
                hex(&ours.signature[..8]),
                hex(&theirs.signature[..8])
            ));
        }
        if theirs.memory != ours.memory {
            differences.push(self.describe_memory_difference(theirs, &ours));
        }
        if differences.is_empty() {
            return Ok(());
        }
        Err(self.diverged(format!("digest mismatch: {}", differences.join("; "))))
    }

    /// Which pages differ: the primary's written pages whose hash differs
    /// here, or else the pages only this replica wrote.
    fn describe_memory_difference(&self, theirs: &StateDigest, ours: &StateDigest) -> String {
        let mismatched = digest::mismatched_pages(&theirs.pages, |gpa| {
            layout::ram_page_index(self.vm.mem_bytes, gpa)
                .and_then(|i| self.memory.as_ref().and_then(|m| m.page(i)))
        });
        if !mismatched.is_empty() {
            let shown: Vec<String> = mismatched
                .iter()
                .take(8)
                .map(|g| format!("{g:#x}"))
                .collect();
            return format!(
                "memory differs: {} of the {} pages the primary wrote differ (first: {})",
                mismatched.len(),
                theirs.pages.len(),
                shown.join(", ")
            );
        }
        let primary: std::collections::BTreeSet<u64> = theirs.pages.iter().map(|p| p.gpa).collect();
        let only_here: Vec<String> = ours
            .pages
            .iter()
            .filter(|p| !primary.contains(&p.gpa))
            .take(8)
            .map(|p| format!("{:#x}", p.gpa))
            .collect();
        if only_here.is_empty() {
            "memory differs in a page neither side wrote since the last digest".to_string()
        } else {
            format!(
                "memory differs: the backup wrote pages the primary did not (first: {})",
                only_here.join(", ")
            )
        }
    }
}
