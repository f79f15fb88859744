//! One guest page's contents as a record carries them.
//!
//! A reader hands out the pages of a sync point whole, but most of them are
//! "unchanged" or "zero" in the log (a few bytes each) and a delta is the
//! cached version with a few bytes changed. So the contents are shared, not
//! copied: the reader's page cache and the decoded records hold the same
//! reference-counted page, and every all-zero page is one static page. On a
//! live backup the link thread decodes while the vCPU runs on the same host;
//! a fresh 4 KiB copy per decoded page there was most of its time
//! (docs/benchmarks.md, "A shared host CPU").

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use super::PAGE_SIZE;

/// Immutable page contents, cheap to clone. Normally [`PAGE_SIZE`] bytes;
/// any other length is kept as given, for the writer to refuse.
#[derive(Clone, PartialEq, Eq)]
pub struct PageData(Arc<[u8]>);

impl PageData {
    /// The all-zero page (one shared allocation).
    pub fn zero() -> Self {
        static ZERO: OnceLock<PageData> = OnceLock::new();
        ZERO.get_or_init(|| PageData(Arc::from(&[0u8; PAGE_SIZE][..])))
            .clone()
    }

    /// A copy of `base` changed in place by `change` (a delta applied):
    /// one allocation and one copy.
    pub(super) fn changed<E>(
        base: &[u8],
        change: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut bytes: Arc<[u8]> = Arc::from(base);
        change(Arc::make_mut(&mut bytes))?;
        Ok(PageData(bytes))
    }

    /// The bytes, to overwrite in place when nothing else holds them (a
    /// writer's cache, whose pages are never handed out); None otherwise.
    pub(super) fn unique_mut(&mut self) -> Option<&mut [u8]> {
        Arc::get_mut(&mut self.0)
    }
}

impl Deref for PageData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for PageData {
    fn from(bytes: &[u8]) -> Self {
        PageData(Arc::from(bytes))
    }
}

impl From<Vec<u8>> for PageData {
    fn from(bytes: Vec<u8>) -> Self {
        PageData(Arc::from(bytes))
    }
}

impl fmt::Debug for PageData {
    /// The length and a hash, not 4 KiB of numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PageData({} bytes, crc {:#010x})",
            self.0.len(),
            crc32fast::hash(&self.0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_share_one_allocation_and_compare_by_contents() {
        let a = PageData::zero();
        let b = PageData::zero();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, PageData::from(vec![0u8; PAGE_SIZE]));
        assert_ne!(a, PageData::from(vec![1u8; PAGE_SIZE]));
    }

    #[test]
    fn a_changed_copy_leaves_its_base_alone() {
        let base = PageData::from(vec![7u8; PAGE_SIZE]);
        let changed = PageData::changed(&base, |bytes| {
            bytes[5] = 9;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(base[5], 7);
        assert_eq!(changed[5], 9);
        assert_eq!(changed.len(), PAGE_SIZE);
        let refused = PageData::changed(&base, |_| Err("bad delta"));
        assert_eq!(refused.unwrap_err(), "bad delta");
    }

    #[test]
    fn only_an_unshared_page_is_changed_in_place() {
        let mut page = PageData::from(vec![1u8; PAGE_SIZE]);
        page.unique_mut().unwrap()[0] = 2;
        assert_eq!(page[0], 2);
        let other = page.clone();
        assert!(page.unique_mut().is_none());
        drop(other);
        assert!(page.unique_mut().is_some());
    }
}
