//! Tests of the format-4 page encoding: round trips through a writer's and
//! a reader's cache, evictions, every kind of entry, wrong bases and
//! corrupted blocks.

use proptest::prelude::*;

use super::*;

type Pages = Vec<(u64, Vec<u8>)>;

/// A writer's side: encode a block against the cache, then commit it.
fn send(cache: &mut PageCache, pages: &Pages, stats: &mut PageStats) -> Vec<u8> {
    let mut e = Enc::default();
    // A used buffer, as a writer reuses it: encode_pages empties it.
    let mut block = vec![0xa5; 100];
    let updates = encode_pages(&mut e, &mut block, cache, pages, stats);
    let bytes = e.finish().expect("encodes");
    commit_pages(cache, &updates);
    cache.trim();
    bytes
}

fn receive(reader: &mut PageDecoder, bytes: &[u8]) -> Result<Pages, String> {
    let mut d = Dec(bytes);
    let pages = reader.decode(&mut d)?;
    d.finish()?;
    reader.end_of_sync_point();
    Ok(pages.into_iter().map(|(g, p)| (g, p.to_vec())).collect())
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE]
}

#[test]
fn each_kind_round_trips_and_deltas_are_small() {
    let mut cache = PageCache::new(16);
    let mut reader = PageDecoder::new(1024);
    let mut stats = PageStats::default();
    let mut random = page(0);
    for (i, b) in random.iter_mut().enumerate() {
        *b = (i * 7919 % 251) as u8 | 1;
    }
    let first: Pages = vec![
        (0x1000, random.clone()),
        (0x5000, page(0)),
        (0x3000, page(9)),
    ];
    let bytes = send(&mut cache, &first, &mut stats);
    assert_eq!(receive(&mut reader, &bytes).unwrap(), first);
    assert_eq!((stats.full, stats.zero), (2, 1));

    // One 8-byte store into the random page, the zero page gets a word,
    // the third is written with the same bytes.
    let mut stored = random.clone();
    stored[1000..1008].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
    let mut word = page(0);
    word[8..16].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let second: Pages = vec![(0x1000, stored), (0x5000, word), (0x3000, page(9))];
    let bytes = send(&mut cache, &second, &mut stats);
    assert_eq!(receive(&mut reader, &bytes).unwrap(), second);
    assert_eq!((stats.delta, stats.same), (2, 1));
    // Two deltas of ~8 bytes and an unchanged page, packed: far below a page.
    assert!(bytes.len() < 100, "{} bytes", bytes.len());
    assert_eq!(cache.usage(), (3, 3 * PAGE_SIZE as u64));
}

/// One decoded block as the reader hands it out (shared contents).
fn receive_shared(reader: &mut PageDecoder, bytes: &[u8]) -> super::Pages {
    let mut d = Dec(bytes);
    let pages = reader.decode(&mut d).expect("decodes");
    d.finish().expect("whole block");
    reader.end_of_sync_point();
    pages
}

#[test]
fn decoded_pages_share_the_cache_and_a_later_block_never_changes_an_earlier_one() {
    let mut cache = PageCache::new(16);
    let mut reader = PageDecoder::new(1024);
    let mut stats = PageStats::default();
    let first: Pages = vec![(0x1000, page(3)), (0x2000, page(0))];
    let one = receive_shared(&mut reader, &send(&mut cache, &first, &mut stats));

    // Unchanged: the very page the first block decoded (no copy); zero:
    // the one shared zero page.
    let two = receive_shared(&mut reader, &send(&mut cache, &first, &mut stats));
    assert_eq!(stats.same, 2);
    assert!(std::ptr::eq(one[0].1.as_ptr(), two[0].1.as_ptr()));
    assert!(std::ptr::eq(
        two[1].1.as_ptr(),
        super::PageData::zero().as_ptr()
    ));

    // A delta on the page and new contents for the zero page: new pages,
    // and what the earlier blocks handed out stays as it was.
    let mut changed = page(3);
    changed[100] = 4;
    let mut filled = page(0);
    filled[7] = 1;
    let third: Pages = vec![(0x1000, changed.clone()), (0x2000, filled.clone())];
    let three = receive_shared(&mut reader, &send(&mut cache, &third, &mut stats));
    assert_eq!(stats.delta, 2);
    assert_eq!(
        (&three[0].1[..], &three[1].1[..]),
        (&changed[..], &filled[..])
    );
    for earlier in [&one, &two] {
        assert_eq!(&earlier[0].1[..], &page(3)[..]);
        assert_eq!(&earlier[1].1[..], &page(0)[..]);
    }
    // And the cache holds the new versions: a delta on them decodes.
    changed[200] = 5;
    let fourth: Pages = vec![(0x1000, changed.clone())];
    let four = receive_shared(&mut reader, &send(&mut cache, &fourth, &mut stats));
    assert_eq!(&four[0].1[..], &changed[..]);
    assert_eq!(
        &three[0].1[100..=200],
        &{
            let mut p = page(3);
            p[100] = 4;
            p
        }[100..=200]
    );
}

#[test]
fn a_dense_change_goes_whole_and_eviction_matches_on_both_sides() {
    let mut cache = PageCache::new(2);
    let mut reader = PageDecoder::new(1024);
    let mut stats = PageStats::default();
    for round in 0..6u8 {
        // Three pages through a cache of two: every round evicts.
        let pages: Pages = (0..3u64)
            .map(|i| {
                (
                    (i + u64::from(round % 2)) * 0x1000,
                    page(round ^ i as u8 ^ 0x5a),
                )
            })
            .collect();
        let bytes = send(&mut cache, &pages, &mut stats);
        assert_eq!(
            receive(&mut reader, &bytes).unwrap(),
            pages,
            "round {round}"
        );
        assert!(cache.usage().0 <= 2);
    }
    // Every byte changes each time: no delta is smaller than the page.
    assert_eq!(stats.delta, 0);
    assert!(stats.full > 0);
}

#[test]
fn a_delta_against_the_wrong_base_is_an_error_naming_the_page() {
    let mut cache = PageCache::new(16);
    let mut stats = PageStats::default();
    let first = vec![(0x2000, page(1))];
    let bytes = send(&mut cache, &first, &mut stats);
    let mut second = page(1);
    second[0] = 7;
    let next = send(&mut cache, &vec![(0x2000, second)], &mut stats);

    // A reader that missed the first block holds no base.
    let mut missed = PageDecoder::new(1024);
    let err = receive(&mut missed, &next).unwrap_err();
    assert!(
        err.contains("page 0x2000") && err.contains("no copy"),
        "{err}"
    );

    // A reader whose copy differs.
    let mut other = PageDecoder::new(1024);
    let mut e = Enc::default();
    let mut other_cache = PageCache::new(16);
    let alt = vec![(0x2000, page(2))];
    let updates = encode_pages(&mut e, &mut Vec::new(), &other_cache, &alt, &mut stats);
    commit_pages(&mut other_cache, &updates);
    receive(&mut other, &e.finish().unwrap()).unwrap();
    let err = receive(&mut other, &next).unwrap_err();
    assert!(
        err.contains("page 0x2000") && err.contains("out of step"),
        "{err}"
    );

    // The right one.
    let mut right = PageDecoder::new(1024);
    receive(&mut right, &bytes).unwrap();
    assert_eq!(receive(&mut right, &next).unwrap()[0].1[0], 7);
}

#[test]
fn limits_are_checked_before_allocating() {
    // A count past the record limit.
    let mut e = Enc::default();
    e.u32(MAX_PAGES_PER_RECORD as u32 + 1);
    e.u32(16);
    let err = receive(&mut PageDecoder::new(1024), &e.finish().unwrap()).unwrap_err();
    assert!(err.contains("more than a record can hold"), "{err}");
    // A cache past the largest a log may ask for.
    let mut e = Enc::default();
    e.u32(0);
    e.u32(MAX_PAGE_CACHE_PAGES + 1);
    e.packed(&[]);
    let err = receive(&mut PageDecoder::new(1024), &e.finish().unwrap()).unwrap_err();
    assert!(err.contains("page cache of"), "{err}");
    // An unpacked length more than the count allows.
    let mut e = Enc::default();
    e.u32(1);
    e.u32(16);
    e.packed(&vec![0u8; 2 * MAX_ENTRY_BYTES]);
    let err = receive(&mut PageDecoder::new(1024), &e.finish().unwrap()).unwrap_err();
    assert!(err.contains("more than this field may hold"), "{err}");
}

#[test]
fn the_cache_size_may_not_change_within_a_log() {
    let mut stats = PageStats::default();
    let mut reader = PageDecoder::new(1024);
    let a = send(
        &mut PageCache::new(16),
        &vec![(0x1000, page(1))],
        &mut stats,
    );
    let b = send(&mut PageCache::new(8), &vec![(0x1000, page(1))], &mut stats);
    receive(&mut reader, &a).unwrap();
    let err = receive(&mut reader, &b).unwrap_err();
    assert!(err.contains("changes size"), "{err}");
}

#[test]
fn malformed_entries_are_clear_errors() {
    let block = |entry: &[u8]| {
        let mut e = Enc::default();
        e.u32(1);
        e.u32(16);
        e.packed(entry);
        e.finish().unwrap()
    };
    let mut stats = PageStats::default();
    let mut cache = PageCache::new(16);
    let base = send(&mut cache, &vec![(0x1000, page(1))], &mut stats);
    let crc = crc32fast::hash(&page(1)).to_le_bytes();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![2, 9], "unknown page kind 9"),
        (vec![2, KIND_FULL, 1, 2], "ends"),
        // A run past the end of the page.
        (
            [&[2, KIND_XOR][..], &crc, &[1, 0xff, 0x1f, 4, 1, 2, 3, 4]].concat(),
            "does not fit in 4096 bytes",
        ),
        // No runs.
        ([&[2, KIND_XOR][..], &crc, &[0]].concat(), "0 runs"),
        // Trailing bytes.
        ([&[2, KIND_SAME][..], &crc, &[0]].concat(), "trailing"),
        // Page number below zero.
        (vec![1, KIND_ZERO], "out of range"),
    ];
    for (entry, expect) in cases {
        let mut reader = PageDecoder::new(1024);
        receive(&mut reader, &base).unwrap();
        let err = receive(&mut reader, &block(&entry)).unwrap_err();
        assert!(err.contains(expect), "{entry:?}: {err}");
    }
}

/// Stores into one page: (offset, byte) pairs; None zeroes the page.
type PageWrites = Option<Vec<(u16, u8)>>;

fn apply_writes(contents: &mut [u8], writes: PageWrites) {
    match writes {
        Some(stores) => {
            for (at, byte) in stores {
                contents[at as usize] = byte;
            }
        }
        None => contents.fill(0),
    }
}

/// Sync points, each a list of (page number, its writes); a page may come
/// with no stores (written back unchanged).
fn rounds() -> impl Strategy<Value = Vec<Vec<(u64, PageWrites)>>> {
    prop::collection::vec(
        prop::collection::btree_map(
            0u64..12,
            prop::option::weighted(
                0.9,
                prop::collection::vec((0u16..PAGE_SIZE as u16, any::<u8>()), 0..40),
            ),
            0..8,
        )
        .prop_map(|m| m.into_iter().collect()),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever pages change how, with evictions: the reader gets exactly
    /// the writer's pages and both caches stay alike and bounded.
    #[test]
    fn random_sync_points_round_trip(rounds in rounds(), capacity in 0u32..10) {
        let mut memory = vec![page(0); 12];
        let mut cache = PageCache::new(capacity);
        let mut reader = PageDecoder::new(1 << 20);
        let mut stats = PageStats::default();
        for round in rounds {
            let mut pages = Vec::new();
            for (number, stores) in round {
                let contents = &mut memory[number as usize];
                apply_writes(contents, stores);
                pages.push((number * PAGE_SIZE as u64, contents.clone()));
            }
            let bytes = send(&mut cache, &pages, &mut stats);
            prop_assert_eq!(receive(&mut reader, &bytes).unwrap(), pages);
            prop_assert!(cache.usage().0 <= u64::from(capacity));
            let held = reader.cache.as_ref().unwrap();
            prop_assert_eq!(held.usage(), cache.usage());
        }
    }

    /// Each page travels as the plain rules say: unchanged when equal to
    /// its cached version, else zero when all zero, else a delta when one
    /// is smaller than the page, else whole (the one-scan encoder decides
    /// as the compare-first one did).
    #[test]
    fn each_page_takes_the_kind_the_rules_say(rounds in rounds(), capacity in 0u32..10) {
        let mut memory = vec![page(0); 12];
        let mut cache = PageCache::new(capacity);
        for round in rounds {
            let mut pages = Vec::new();
            let mut expected = PageStats::default();
            for (number, stores) in round {
                let contents = &mut memory[number as usize];
                apply_writes(contents, stores);
                let gpa = number * PAGE_SIZE as u64;
                match cache.get(gpa) {
                    Some((base, _)) if base == &contents[..] => expected.same += 1,
                    _ if contents.iter().all(|&b| b == 0) => expected.zero += 1,
                    Some((base, _)) if encode_runs(base, contents, PAGE_SIZE, &mut Vec::new()).is_some() => {
                        expected.delta += 1
                    }
                    _ => expected.full += 1,
                }
                pages.push((gpa, contents.clone()));
            }
            let mut stats = PageStats::default();
            send(&mut cache, &pages, &mut stats);
            prop_assert_eq!(stats, expected);
        }
    }

    /// Any bytes as a block: an error or pages, never a panic, never more
    /// pages than it claims.
    #[test]
    fn arbitrary_blocks_never_panic(
        count in 0u32..4,
        entry in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut e = Enc::default();
        e.u32(count);
        e.u32(4);
        e.packed(&entry);
        let bytes = e.finish().unwrap();
        let mut reader = PageDecoder::new(1024);
        if let Ok(pages) = receive(&mut reader, &bytes) {
            prop_assert_eq!(pages.len(), count as usize);
        }
    }
}

proptest! {
    /// The cache evicts exactly what a plain least-recently-carried list
    /// would, however often pages are carried again (its stamp queue is
    /// compacted along the way).
    #[test]
    fn eviction_is_least_recently_carried_first(
        capacity in 1u32..6,
        ops in prop::collection::vec((0u64..10, any::<bool>(), any::<bool>()), 1..400),
    ) {
        let mut cache = PageCache::new(capacity);
        // Most recently carried last.
        let mut model: Vec<u64> = Vec::new();
        for (number, stored, end_of_sync_point) in ops {
            let gpa = number * PAGE_SIZE as u64;
            let held = cache.get(gpa).is_some();
            if stored || !held {
                cache.store(gpa, &page(number as u8));
            } else {
                cache.touch(gpa);
            }
            model.retain(|&g| g != gpa);
            model.push(gpa);
            if end_of_sync_point {
                cache.trim();
                let excess = model.len().saturating_sub(capacity as usize);
                model.drain(..excess);
            }
            for &g in &model {
                prop_assert!(cache.get(g).is_some(), "{:#x} evicted early", g);
            }
            prop_assert_eq!(cache.entries.len(), model.len());
            prop_assert!(cache.by_stamp.len() <= 2 * cache.entries.len() + 65);
        }
    }
}
