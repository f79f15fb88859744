//! Which dirtied guest pages stay write-enabled between dirty-log harvests
//! ("hot" pages), sans-IO.
//!
//! Under shadow paging (hosts without EPT/NPT) a harvest that re-protects
//! a page makes the guest's next store to it fault, a VM exit. With KVM's
//! manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`)
//! `KVM_GET_DIRTY_LOG` reads the bitmap without re-protecting anything, and
//! `KVM_CLEAR_DIRTY_LOG` re-protects only the pages it is given. KVM sets a
//! page's bit whenever it makes the page writable, so a page the guest can
//! store to without a fault always has its bit set, and a page left
//! write-enabled ("kept") is reported by every harvest, written or not:
//! what a harvest reports stays a superset of what the old automatic
//! re-protection reported, so sync points and digests stay exact (a sync
//! point's unchanged page costs a few bytes against the log's page cache).
//!
//! Reporting kept pages only when their contents changed was tried and
//! is wrong on these hosts: KVM's shadow paging sets accessed/dirty bits in
//! guest page tables at times that differ between primary and backup, and
//! a backup relies on every touched page being shipped again to take the
//! primary's bits (the `remap` guest's replay diverged in its page
//! directory).
//!
//! The rule: a page that faults is re-protected at once the first time
//! (a page written once, as a streaming writer does, would only be shipped
//! again and again). One that faults again within [`REFAULT_WITHIN`]
//! harvests of being re-protected is kept for a period, [`BASE_PERIOD`]
//! harvests the first time and twice its last period (up to
//! [`MAX_PERIOD`]) each time it faults again that soon after its period
//! ended. At most `budget` pages are kept (each costs every sync point a
//! page copy and comparison); beyond it the pages closest to the end of
//! their period go first. Budget 0 re-protects every page at every
//! harvest, as KVM does by itself without manual protection.

use std::collections::{BTreeSet, VecDeque};

use rustc_hash::{FxHashMap as HashMap, FxHashSet};

/// Harvests a page is first kept.
pub const BASE_PERIOD: u32 = 8;
/// Most harvests a page is kept in one go.
pub const MAX_PERIOD: u32 = 256;
/// A page that faults again within this many harvests of being
/// re-protected is kept.
pub const REFAULT_WITHIN: u64 = 4;
/// Re-protected pages remembered for [`REFAULT_WITHIN`], at most this many
/// per page of budget (the oldest forgotten first).
const REMEMBERED_PER_BUDGET_PAGE: usize = 8;

/// The kept pages and recent history; see the module comment.
#[derive(Debug, Default)]
pub struct HotPages {
    budget: usize,
    /// Harvests so far.
    harvest: u64,
    /// Kept pages: the harvest that re-protects them, and their period.
    kept: HashMap<u64, (u64, u32)>,
    /// `kept` by (end, page): the first ends first.
    by_end: BTreeSet<(u64, u64)>,
    /// Pages re-protected in the last [`REFAULT_WITHIN`] harvests: when,
    /// and the period the next keep doubles; `released_order` holds the
    /// same, oldest first.
    released: HashMap<u64, (u64, u32)>,
    released_order: VecDeque<(u64, u64)>,
}

impl HotPages {
    pub fn new(budget: usize) -> Self {
        HotPages {
            budget,
            ..Default::default()
        }
    }

    /// Most pages kept write-enabled; a smaller budget takes effect at the
    /// next harvest.
    pub fn set_budget(&mut self, pages: usize) {
        self.budget = pages;
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Pages kept write-enabled now.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Dirty logging was turned off: KVM forgot every bit, and turning it
    /// on again protects every page.
    pub fn reset(&mut self) {
        *self = HotPages::new(self.budget);
    }

    /// One harvest. `dirty` holds every page whose bit is set now (each
    /// once, in any order); returns those to re-protect (clear), ascending.
    /// Every other page of `dirty` stays write-enabled with its bit set.
    pub fn harvest(&mut self, dirty: &[u64]) -> Vec<u64> {
        self.harvest += 1;
        let now = self.harvest;
        let kept_before = self.kept.len();
        let mut reported_kept = 0;
        let mut clear = Vec::new();
        let mut released = Vec::new();
        for &page in dirty {
            if self.kept.contains_key(&page) {
                reported_kept += 1;
                continue;
            }
            // Its bit was cleared and is set again: the guest stored to it.
            let period = match self.released.remove(&page) {
                Some((at, last)) if self.budget > 0 && now - at <= REFAULT_WITHIN => {
                    last.saturating_mul(2).clamp(BASE_PERIOD, MAX_PERIOD)
                }
                _ => {
                    clear.push(page);
                    // Half: a fault soon after this keeps it BASE_PERIOD.
                    released.push((page, BASE_PERIOD / 2));
                    continue;
                }
            };
            let end = now + u64::from(period);
            self.kept.insert(page, (end, period));
            self.by_end.insert((end, page));
        }
        if reported_kept < kept_before {
            self.drop_unreported(dirty);
        }
        // Ended periods, then the budget.
        while let Some(&(end, page)) = self.by_end.first() {
            if end > now && self.kept.len() <= self.budget {
                break;
            }
            self.by_end.pop_first();
            let (_, period) = self.kept.remove(&page).expect("by_end mirrors kept");
            clear.push(page);
            released.push((page, period));
        }
        self.remember_released(now, &released);
        clear.sort_unstable();
        clear
    }

    /// Note the pages re-protected at harvest `now`, forgetting those
    /// re-protected more than [`REFAULT_WITHIN`] harvests ago and the
    /// oldest beyond the bound.
    fn remember_released(&mut self, now: u64, released: &[(u64, u32)]) {
        if self.budget == 0 {
            self.released.clear();
            self.released_order.clear();
            return;
        }
        for &(page, period) in released {
            self.released.insert(page, (now, period));
            self.released_order.push_back((now, page));
        }
        let most = self.budget.saturating_mul(REMEMBERED_PER_BUDGET_PAGE);
        while let Some(&(at, page)) = self.released_order.front() {
            if now - at <= REFAULT_WITHIN && self.released_order.len() <= most {
                break;
            }
            self.released_order.pop_front();
            if self.released.get(&page).is_some_and(|&(a, _)| a == at) {
                self.released.remove(&page);
            }
        }
    }

    /// Forget kept pages whose bit was not reported: KVM has them protected
    /// (never the case while the caller reports every set bit and resets
    /// this policy whenever dirty logging restarts).
    fn drop_unreported(&mut self, dirty: &[u64]) {
        let reported: FxHashSet<u64> = dirty.iter().copied().collect();
        let gone: Vec<u64> = self
            .kept
            .keys()
            .filter(|p| !reported.contains(p))
            .copied()
            .collect();
        for page in gone {
            let (end, _) = self.kept.remove(&page).expect("listed above");
            self.by_end.remove(&(end, page));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const P: u64 = 0x1000;
    const Q: u64 = 0x2000;
    const R: u64 = 0x3000;

    /// Harvests until `page` (kept, its bit set) is let go; how many it
    /// stayed.
    fn kept_for(hot: &mut HotPages, page: u64) -> u32 {
        let mut n = 0;
        while hot.harvest(&[page]).is_empty() {
            n += 1;
            assert!(n <= MAX_PERIOD, "kept past the longest period");
        }
        n
    }

    #[test]
    fn budget_zero_re_protects_every_page_at_every_harvest() {
        let mut hot = HotPages::new(0);
        assert_eq!(hot.harvest(&[Q, P]), vec![P, Q]);
        assert_eq!(hot.harvest(&[P]), vec![P]);
        assert!(hot.is_empty());
    }

    #[test]
    fn a_page_that_faults_once_is_re_protected_and_kept_only_if_it_faults_again_soon() {
        let mut hot = HotPages::new(16);
        assert_eq!(hot.harvest(&[P, Q]), vec![P, Q]);
        for _ in 1..REFAULT_WITHIN {
            assert!(hot.harvest(&[]).is_empty());
        }
        // P faults again within the window, Q after it.
        assert!(hot.harvest(&[P]).is_empty());
        assert_eq!(hot.harvest(&[P, Q]), vec![Q]);
        assert_eq!(hot.len(), 1);
    }

    #[test]
    fn a_page_that_keeps_faulting_right_after_its_period_is_kept_longer_up_to_the_cap() {
        let mut hot = HotPages::new(16);
        assert_eq!(hot.harvest(&[P]), vec![P]);
        assert!(hot.harvest(&[P]).is_empty());
        // Kept BASE_PERIOD harvests in all (one above).
        assert_eq!(kept_for(&mut hot, P) + 1, BASE_PERIOD);
        assert!(hot.harvest(&[P]).is_empty());
        assert_eq!(kept_for(&mut hot, P) + 1, BASE_PERIOD * 2);
        for _ in 0..10 {
            assert!(hot.harvest(&[P]).is_empty());
            kept_for(&mut hot, P);
        }
        assert!(hot.harvest(&[P]).is_empty());
        assert_eq!(kept_for(&mut hot, P) + 1, MAX_PERIOD);
        // Quiet for longer than the window: it starts over.
        for _ in 0..=REFAULT_WITHIN {
            assert!(hot.harvest(&[]).is_empty());
        }
        assert_eq!(hot.harvest(&[P]), vec![P]);
    }

    #[test]
    fn beyond_the_budget_the_pages_closest_to_their_end_go_first() {
        let mut hot = HotPages::new(2);
        hot.harvest(&[P]);
        hot.harvest(&[P]);
        hot.harvest(&[P, Q, R]);
        // Q and R fault again and are kept; P ends first.
        assert_eq!(hot.harvest(&[P, Q, R]), vec![P]);
        assert_eq!(hot.len(), 2);
        // A lower budget takes effect at the next harvest, the smaller page
        // first among equal ends.
        hot.set_budget(1);
        assert_eq!(hot.harvest(&[Q, R]), vec![Q]);
        hot.set_budget(0);
        assert_eq!(hot.harvest(&[R]), vec![R]);
        assert!(hot.is_empty());
    }

    #[test]
    fn kept_pages_the_caller_no_longer_reports_are_forgotten() {
        let mut hot = HotPages::new(16);
        hot.harvest(&[P, Q]);
        assert!(hot.harvest(&[P, Q]).is_empty());
        // Q's bit vanished (logging restarted behind the policy's back).
        assert!(hot.harvest(&[P]).is_empty());
        assert_eq!(hot.len(), 1);
        hot.reset();
        assert!(hot.is_empty());
        assert_eq!(hot.budget(), 16);
    }

    proptest! {
        /// The safety rule: every reported page is either re-protected or
        /// kept write-enabled (and then reported again next time), never
        /// both; only reported pages are cleared; at most `budget` kept.
        #[test]
        fn every_reported_page_is_re_protected_or_kept(
            budget in 0usize..6,
            writes in proptest::collection::vec(
                proptest::collection::btree_set(0u64..12, 0..8), 1..80),
        ) {
            let mut hot = HotPages::new(budget);
            let mut kept: BTreeSet<u64> = BTreeSet::new();
            for written in writes {
                // What KVM reports: pages written since their bit was
                // cleared, and every page left write-enabled.
                let dirty: BTreeSet<u64> = written.union(&kept).copied().collect();
                let list: Vec<u64> = dirty.iter().copied().collect();
                let clear = hot.harvest(&list);
                let cleared: BTreeSet<u64> = clear.iter().copied().collect();
                prop_assert_eq!(cleared.len(), clear.len());
                prop_assert!(cleared.is_subset(&dirty));
                kept = dirty.difference(&cleared).copied().collect();
                prop_assert_eq!(kept.len(), hot.len());
                prop_assert!(hot.len() <= budget);
            }
        }
    }
}
