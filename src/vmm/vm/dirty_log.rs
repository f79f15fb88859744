//! KVM's dirty log: turning it on and off, and harvesting it, with manual
//! protection where the host has it (hot pages stay write-enabled; see
//! `crate::vmm::hot_pages`).

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use super::{kvm_err, Vm, VmError};
use crate::replay::digest::DirtyPages;
use crate::vmm::sys;

/// Bytes in a page.
const PAGE: u64 = 4096;

/// Turn on manual dirty-log protection where KVM has it (then
/// KVM_GET_DIRTY_LOG leaves pages writable and KVM_CLEAR_DIRTY_LOG
/// re-protects them); false where it does not, and harvests re-protect
/// every page as before.
pub(super) fn enable_manual_protect(vm_fd: &VmFd) -> bool {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let modes = vm_fd.check_extension_raw(u64::from(cap));
    let enable = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    if modes <= 0 || (modes as u64) & enable == 0 {
        return false;
    }
    let request = kvm_bindings::kvm_enable_cap {
        cap,
        args: [enable, 0, 0, 0],
        ..Default::default()
    };
    match vm_fd.enable_cap(&request) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("manual dirty-log protection not enabled: {e}");
            false
        }
    }
}

impl Vm {
    /// Turn KVM dirty-page logging (and the noting of the VMM's own writes)
    /// on (record/replay needs it) or off.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        if on != self.dirty_tracking {
            // Off frees KVM's bitmaps; on write-protects every page again.
            self.hot_pages.reset();
        }
        self.dirty_tracking = on;
        if !on {
            self.userspace_dirty.borrow_mut().take();
        }
        for slot in &mut self.slots {
            slot.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the same slot, address range and host mapping as
            // registered in `create`; only the flags change.
            unsafe { self.vm_fd.set_user_memory_region(*slot) }
                .map_err(kvm_err("set dirty logging"))?;
        }
        Ok(())
    }

    /// Most pages a harvest may leave write-enabled ("hot" pages, which
    /// every later harvest reports again until they are let go; see
    /// `hot_pages.rs`). 0, the default, re-protects every page at every
    /// harvest. Without manual dirty-log protection on this host it has no
    /// effect.
    pub fn set_hot_page_budget(&mut self, pages: usize) {
        self.hot_pages.set_budget(pages);
    }

    /// Fetch KVM's dirty log (and the VMM's own writes) into every set in
    /// `into`, and re-protect the pages it names; with manual protection,
    /// hot pages stay write-enabled instead, and every later harvest
    /// reports them again until they are let go (see `hot_pages.rs`).
    pub fn collect_dirty_pages(&mut self, into: &mut [&mut DirtyPages]) -> Result<(), VmError> {
        let mut found = std::mem::take(&mut *self.userspace_dirty.borrow_mut());
        let mut bitmaps = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            if slot.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
                continue;
            }
            let bitmap = self
                .vm_fd
                .get_dirty_log(slot.slot, slot.memory_size as usize)
                .map_err(kvm_err("get dirty log"))?;
            found.add_bitmap(slot.guest_phys_addr, &bitmap);
            bitmaps.push((*slot, bitmap));
        }
        if self.manual_protect {
            if !(self.hot_pages.budget() == 0 && self.hot_pages.is_empty()) {
                self.keep_hot_pages(&mut bitmaps);
            }
            for (slot, bits) in &mut bitmaps {
                clear_bits(&self.vm_fd, slot, bits)?;
            }
        }
        for set in into.iter_mut() {
            set.merge(&found);
        }
        Ok(())
    }

    /// Turn each slot's bitmap into the bits to clear: those of the pages
    /// the hot-page policy lets go.
    fn keep_hot_pages(&mut self, bitmaps: &mut [(kvm_userspace_memory_region, Vec<u64>)]) {
        let mut dirty = Vec::new();
        for (slot, bitmap) in bitmaps.iter() {
            let mut pages = DirtyPages::default();
            pages.add_bitmap(slot.guest_phys_addr, bitmap);
            dirty.extend(pages.take());
        }
        let clear = self.hot_pages.harvest(&dirty);
        for (slot, bits) in bitmaps.iter_mut() {
            bits.fill(0);
            let start = slot.guest_phys_addr;
            for &gpa in clear
                .iter()
                .filter(|&&gpa| (start..start + slot.memory_size).contains(&gpa))
            {
                let page = (gpa - start) / PAGE;
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }
}

/// Clear the bits set in `bitmap` (the slot's pages) and re-protect those
/// pages; nothing to do when none is set.
fn clear_bits(
    vm_fd: &VmFd,
    slot: &kvm_userspace_memory_region,
    bitmap: &mut [u64],
) -> Result<(), VmError> {
    if bitmap.iter().all(|&w| w == 0) {
        return Ok(());
    }
    let pages = u32::try_from(slot.memory_size / PAGE).map_err(|_| VmError::Kvm {
        what: "clear dirty log",
        source: vmm_sys_util::errno::Error::new(libc::EINVAL),
    })?;
    sys::clear_dirty_log(vm_fd, slot.slot, pages, bitmap).map_err(kvm_err("clear dirty log"))
}
