//! The log codec's tests: round trips, every truncation and flipped byte,
//! limits enforced by the writer and checked by the reader.

use super::codec::{write_frame, Enc};
use super::*;

fn header() -> LogHeader {
    LogHeader {
        kernel_hash: [7; 32],
        initrd_hash: Some([9; 32]),
        cmdline: "console=ttyS0".into(),
        mem_bytes: 64 << 20,
        boot_unix_secs: 1_700_000_000,
        host_cpu: 1,
        net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        tick_delivery: TickDelivery::AtLandmarks,
    }
}

fn sample_records() -> Vec<Record> {
    vec![
        Record::IoTime {
            landmark: 3,
            now: 12_345,
        },
        Record::Poll {
            landmark: 4,
            now: 1_000_000,
        },
        Record::SerialInput {
            landmark: 4,
            bytes: b"hi\n".to_vec(),
        },
        Record::Interrupt {
            landmark: 4,
            vector: 0x20,
        },
        Record::TimeRead {
            landmark: 9,
            value: u64::MAX - 1,
        },
        Record::Random {
            landmark: 9,
            value: 0x1234_5678_9abc_def0,
        },
        Record::Trace {
            landmark: 9,
            rip: 0xffff_ffff_8100_0000,
            signature: [3; 16],
        },
        Record::NetRx {
            landmark: 9,
            frame: vec![0xee; 60],
        },
        Record::NetTx {
            landmark: 9,
            len: 42,
            hash: [4; 16],
        },
        Record::SyncPoint {
            landmark: 10,
            cpu: Box::new(CpuStateBytes {
                regs: vec![1; 144],
                sregs: vec![2; 312],
                fpu: vec![3; 416],
                events: vec![4; 64],
                msrs: vec![7; 24],
                xsave: vec![0x11; 4096],
            }),
            vmm_state: vec![8, 9],
            pages: vec![
                (0x1000, vec![0xaa; PAGE_SIZE].into()),
                (0x7000, vec![0x55; PAGE_SIZE].into()),
            ],
        },
        Record::SyncState {
            landmark: 10,
            state: Box::new(sample_sync_state()),
        },
        Record::Digest {
            landmark: 10,
            digest: Box::new(StateDigest {
                cpu: [[5; 32], [6; 32], [7; 32], [8; 32], [9; 32], [10; 32]],
                devices: [11; 32],
                signature: [12; 32],
                memory: [13; 32],
                pages: vec![PageHash {
                    gpa: 0x2000,
                    hash: [6; 32],
                }],
            }),
        },
        Record::End {
            landmark: 11,
            reason: EndReason::ResetRequested,
        },
    ]
}

fn sample_sync_state() -> ResumeState {
    ResumeState {
        clock: 987_654_321,
        signature: [0x21; 32],
        signature_last: [0x22; 16],
        device_unflushed: true,
        devices: br#"{"version":4,"pic":{"imr":255}}"#.repeat(20),
        since: 4,
        pages: vec![
            (0x3000, vec![0x5a; PAGE_SIZE].into()),
            (0x9000, PageData::zero()),
        ],
    }
}

fn encoded() -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    for r in sample_records() {
        w.append(&r).unwrap();
    }
    let (bytes, records) = w.written();
    let out = w.into_inner();
    assert_eq!(bytes, out.len() as u64);
    assert_eq!(records, 13);
    out
}

fn read_all(bytes: &[u8]) -> Result<(LogHeader, Vec<Record>), LogError> {
    let mut r = LogReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(rec) = r.next_record()? {
        out.push(rec);
    }
    Ok((r.header().clone(), out))
}

#[test]
fn round_trip() {
    let (h, records) = read_all(&encoded()).unwrap();
    assert_eq!(h, header());
    assert_eq!(records, sample_records());
}

#[test]
fn header_without_initrd_round_trips() {
    let h = LogHeader {
        initrd_hash: None,
        ..header()
    };
    let w = LogWriter::new(Vec::new(), &h).unwrap();
    let bytes = w.into_inner();
    assert_eq!(LogReader::new(&bytes[..]).unwrap().header(), &h);
}

#[test]
fn every_truncation_is_an_error_never_a_silent_success() {
    let full = encoded();
    // Cutting at a frame boundary gives a shorter valid log: the replay
    // engine catches that (no End record). Cutting anywhere else must fail.
    let mut boundaries = vec![];
    let mut r = LogReader::new(&full[..]).unwrap();
    boundaries.push(r.offset());
    while r.next_record().unwrap().is_some() {
        boundaries.push(r.offset());
    }
    for cut in 0..full.len() {
        let result = read_all(&full[..cut]);
        if boundaries.contains(&(cut as u64)) {
            assert!(result.is_ok(), "cut at boundary {cut}");
        } else {
            let err = result.unwrap_err();
            assert!(
                matches!(err, LogError::Truncated { .. } | LogError::BadMagic),
                "cut {cut}: {err}"
            );
        }
    }
}

#[test]
fn truncation_names_record_and_last_landmark() {
    let full = encoded();
    let err = read_all(&full[..full.len() - 3]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("truncated in record 12"), "{msg}");
    assert!(msg.contains("landmark Some(10)"), "{msg}");
}

/// The magic, `version` and the header of a log of that format (the
/// header's last byte, the tick delivery, came with format 6).
fn log_start(version: u16) -> Vec<u8> {
    let mut out = LOG_MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    let mut payload = codec::encode_header(&header()).unwrap();
    if version < 6 {
        payload.pop();
    }
    write_frame(&mut out, KIND_HEADER, &payload).unwrap();
    out
}

/// A version-3 log (every page whole) with one sync point with a valid
/// frame (so the CRC passes) but bad insides: `pages` page addresses, then
/// contents claiming `unpacked` bytes in `block`.
fn sync_point_frame(pages: u32, unpacked: u32, block: &[u8]) -> Vec<u8> {
    let mut out = log_start(3);
    let mut e = Enc::default();
    e.u64(5);
    // regs, sregs, fpu, events, msrs
    for _ in 0..5 {
        e.bytes(&[]);
    }
    e.packed(&[]); // xsave
    e.bytes(&[]); // VMM state
    e.u32(pages);
    for i in 0..pages.min(4) {
        e.u64(u64::from(i) * PAGE_SIZE as u64);
    }
    e.u32(unpacked);
    e.bytes(block);
    write_frame(&mut out, KIND_SYNC_POINT, &e.finish().unwrap()).unwrap();
    out
}

#[test]
fn version_3_sync_points_still_read_and_their_contents_are_checked() {
    let two = 2 * PAGE_SIZE as u32;
    let block = lz4_flex::block::compress(&vec![0u8; two as usize]);
    let (_, records) = read_all(&sync_point_frame(2, two, &block)).unwrap();
    let Record::SyncPoint { pages, .. } = &records[0] else {
        panic!("{records:?}")
    };
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[1], (PAGE_SIZE as u64, PageData::zero()));
    // Contents that are fewer bytes than the pages named.
    let err = read_all(&sync_point_frame(3, two, &block)).unwrap_err();
    assert!(
        err.to_string().contains("expected 12288 for 3 pages"),
        "{err}"
    );
    // A length that does not match what the block holds.
    let err = read_all(&sync_point_frame(2, two + 1, &block)).unwrap_err();
    assert!(matches!(err, LogError::Malformed { .. }), "{err}");
    // Garbage instead of LZ4.
    let err = read_all(&sync_point_frame(2, two, &[0xff; 40])).unwrap_err();
    assert!(err.to_string().contains("does not decompress"), "{err}");
    // Counts and lengths no frame could back are refused before allocating.
    let err = read_all(&sync_point_frame(u32::MAX, two, &block)).unwrap_err();
    assert!(
        err.to_string().contains("more than a record can hold"),
        "{err}"
    );
    let err = read_all(&sync_point_frame(2, u32::MAX, &block)).unwrap_err();
    assert!(
        err.to_string().contains("more than this field may hold"),
        "{err}"
    );
    // A small block cannot unpack to the claimed size: refused before
    // the buffer is allocated.
    let err = read_all(&sync_point_frame(4, 4 * PAGE_SIZE as u32, &[0; 8])).unwrap_err();
    assert!(
        err.to_string().contains("more than LZ4 can expand"),
        "{err}"
    );
}

#[test]
fn every_flipped_byte_is_detected() {
    let full = encoded();
    for i in 0..full.len() {
        let mut bad = full.clone();
        bad[i] ^= 0x40;
        assert!(read_all(&bad).is_err(), "flip at byte {i} went unnoticed");
    }
}

#[test]
fn wrong_magic_version_and_huge_lengths() {
    assert!(matches!(
        LogReader::new(&b"NOTALOG!\x01\x00"[..]),
        Err(LogError::BadMagic)
    ));
    assert!(matches!(LogReader::new(&b""[..]), Err(LogError::BadMagic)));
    let mut v = encoded();
    v[8] = 99;
    assert!(matches!(
        LogReader::new(&v[..]),
        Err(LogError::UnsupportedVersion(99))
    ));
    let mut huge = LOG_MAGIC.to_vec();
    huge.extend_from_slice(&LOG_VERSION.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = LogReader::new(&huge[..]).err().unwrap();
    assert!(err.to_string().contains("frame length"), "{err}");
}

#[test]
fn unknown_kinds_with_valid_checksums_are_malformed() {
    let mut bytes = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
    write_frame(&mut bytes, 0x7f, &5u64.to_le_bytes()).unwrap();
    let err = read_all(&bytes).unwrap_err();
    assert!(
        err.to_string().contains("unknown record kind 0x7f"),
        "{err}"
    );
    let mut bytes = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
    write_frame(&mut bytes, KIND_INTERRUPT, &[1, 2, 3]).unwrap();
    assert!(read_all(&bytes).unwrap_err().to_string().contains("ends"));
}

#[test]
fn a_sync_point_too_big_for_one_record_is_split_and_read_back_whole() {
    let n = MAX_PAGES_PER_RECORD * 2 + 3;
    let pages: Pages = (0..n)
        .map(|i| {
            (
                i as u64 * PAGE_SIZE as u64,
                vec![(i % 251) as u8; PAGE_SIZE].into(),
            )
        })
        .collect();
    let sync = Record::SyncPoint {
        landmark: 7,
        cpu: Box::new(CpuStateBytes::default()),
        vmm_state: vec![1],
        pages,
    };
    let h = LogHeader {
        mem_bytes: 1 << 30,
        ..header()
    };
    let mut w = LogWriter::new(Vec::new(), &h).unwrap();
    w.append(&sync).unwrap();
    w.append(&Record::End {
        landmark: 8,
        reason: EndReason::Stopped,
    })
    .unwrap();
    assert_eq!(w.written().1, 4, "two SyncPages, the SyncPoint, the End");
    let (_, records) = read_all(&w.into_inner()).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0], sync);
}

#[test]
fn split_pages_must_be_followed_by_their_sync_point() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.append(&Record::SyncPages {
        landmark: 3,
        pages: vec![(0x1000, vec![1; PAGE_SIZE].into())],
    })
    .unwrap();
    w.append(&Record::Poll {
        landmark: 3,
        now: 1,
    })
    .unwrap();
    let err = read_all(&w.into_inner()).unwrap_err();
    assert!(
        err.to_string().contains("followed by a poll record"),
        "{err}"
    );
}

#[test]
fn the_writer_refuses_what_the_reader_would_refuse() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let before = w.written();
    let err = w
        .append(&Record::NetRx {
            landmark: 1,
            frame: vec![0; MAX_NET_FRAME + 1],
        })
        .unwrap_err();
    assert!(err.to_string().contains("refusing to log"), "{err}");
    let err = w
        .append(&Record::SyncPages {
            landmark: 1,
            pages: vec![(0x1001, vec![0; PAGE_SIZE].into())],
        })
        .unwrap_err();
    assert!(err.to_string().contains("not one aligned page"), "{err}");
    assert_eq!(w.written(), before, "nothing was written");
}

#[test]
fn records_out_of_landmark_order_are_malformed() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    for landmark in [5, 4] {
        w.append(&Record::Poll { landmark, now: 1 }).unwrap();
    }
    let err = read_all(&w.into_inner()).unwrap_err();
    assert!(err.to_string().contains("out of order"), "{err}");
}

#[test]
fn a_huge_frame_length_with_few_bytes_behind_it_is_truncated_not_allocated() {
    let mut bytes = LogWriter::new(Vec::new(), &header()).unwrap().into_inner();
    bytes.extend_from_slice(&(MAX_FRAME_BYTES - 1).to_le_bytes());
    bytes.extend_from_slice(&[KIND_POLL, 1, 2, 3]);
    let err = read_all(&bytes).unwrap_err();
    assert!(matches!(err, LogError::Truncated { .. }), "{err}");
}

#[test]
fn a_record_past_the_limit_is_refused_whole_and_nothing_of_it_is_written() {
    let n = MAX_PAGES_PER_RECORD + 5;
    let pages: Pages = (0..n)
        .map(|i| (i as u64 * PAGE_SIZE as u64, PageData::zero()))
        .collect();
    let sync = Record::SyncPoint {
        landmark: 3,
        cpu: Box::new(CpuStateBytes::default()),
        vmm_state: vec![],
        pages,
    };
    let h = LogHeader {
        mem_bytes: 1 << 30,
        ..header()
    };
    // The size of the whole sync point (two frames), measured without a limit.
    let mut probe = LogWriter::new(Vec::new(), &h).unwrap();
    let start = probe.written().0;
    probe.append(&sync).unwrap();
    let sync_bytes = probe.written().0 - start;

    let mut w = LogWriter::new(Vec::new(), &h).unwrap();
    w.set_limit(Some(start + sync_bytes - 1));
    let err = w.append(&sync).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    let text = err.to_string();
    assert!(text.contains("size limit of"), "{text}");
    assert!(
        text.contains("the sync-point record of landmark 3"),
        "{text}"
    );
    assert_eq!(w.written(), (start, 0), "nothing of it counted");
    assert_eq!(w.into_inner().len() as u64, start, "nothing of it written");

    let mut w = LogWriter::new(Vec::new(), &h).unwrap();
    w.set_limit(Some(start + sync_bytes));
    w.append(&sync).unwrap();
    assert_eq!(w.written(), (start + sync_bytes, 2));
    let (_, records) = read_all(&w.into_inner()).unwrap();
    assert_eq!(records, vec![sync]);
}

fn sync_point(landmark: u64, pages: Pages) -> Record {
    Record::SyncPoint {
        landmark,
        cpu: Box::new(CpuStateBytes::default()),
        vmm_state: vec![],
        pages,
    }
}

/// Pages of incompressible bytes, each with one 8-byte word set to `word`.
fn noisy_pages(n: usize, word: u64) -> Pages {
    (0..n)
        .map(|i| {
            let mut data: Vec<u8> = (0..PAGE_SIZE)
                .map(|b| ((b * 131 + i * 7 + (b * b) % 97) % 253) as u8)
                .collect();
            data[64..72].copy_from_slice(&word.to_le_bytes());
            (i as u64 * PAGE_SIZE as u64, data.into())
        })
        .collect()
}

#[test]
fn split_sync_points_go_as_deltas_the_second_time_and_read_back_whole() {
    let h = LogHeader {
        mem_bytes: 1 << 30,
        ..header()
    };
    let n = MAX_PAGES_PER_RECORD + 3;
    let mut w = LogWriter::new(Vec::new(), &h).unwrap();
    w.set_page_cache(n as u32 + 10).unwrap();
    let first = sync_point(2, noisy_pages(n, 1));
    let second = sync_point(3, noisy_pages(n, 2));
    let start = w.written().0;
    w.append(&first).unwrap();
    let first_bytes = w.written().0 - start;
    w.append(&second).unwrap();
    let second_bytes = w.written().0 - start - first_bytes;
    let stats = w.page_stats();
    assert_eq!((stats.full, stats.delta), (n as u64, n as u64));
    assert_eq!(stats.cache_pages, n as u64);
    assert!(
        second_bytes * 50 < first_bytes,
        "{second_bytes} bytes of deltas against {first_bytes} whole"
    );
    let err = w.set_page_cache(4).unwrap_err();
    assert!(err.to_string().contains("cannot change"), "{err}");
    let (_, records) = read_all(&w.into_inner()).unwrap();
    assert_eq!(records, vec![first, second]);
}

#[test]
fn a_sync_point_refused_by_the_limit_leaves_the_page_cache_as_readers_have_it() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let first = sync_point(2, noisy_pages(4, 1));
    w.append(&first).unwrap();
    w.set_limit(Some(w.written().0 + 10));
    let refused = sync_point(3, noisy_pages(4, 2));
    let err = w.append(&refused).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    w.set_limit(None);
    // Sent against the first sync point's pages, which readers hold.
    let third = sync_point(4, noisy_pages(4, 3));
    w.append(&third).unwrap();
    assert_eq!(w.page_stats().delta, 4);
    let (_, records) = read_all(&w.into_inner()).unwrap();
    assert_eq!(records, vec![first, third]);
}

#[test]
fn page_cache_sizes_are_bounded_and_zero_sends_every_page_whole() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let err = w.set_page_cache(MAX_PAGE_CACHE_PAGES + 1).unwrap_err();
    assert!(err.to_string().contains("more than a log may ask"), "{err}");
    w.set_page_cache(0).unwrap();
    let records = vec![
        sync_point(2, noisy_pages(3, 1)),
        sync_point(3, noisy_pages(3, 2)),
    ];
    for r in &records {
        w.append(r).unwrap();
    }
    let stats = w.page_stats();
    assert_eq!((stats.full, stats.delta, stats.cache_pages), (6, 0, 0));
    assert_eq!(read_all(&w.into_inner()).unwrap().1, records);
}

#[test]
fn a_page_twice_in_one_sync_point_is_refused() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let mut pages = noisy_pages(2, 1);
    pages.push(pages[0].clone());
    let err = w.append(&sync_point(2, pages)).unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
}

/// A sync point of no pages whose vCPU state is the sample's with RIP
/// (the first 8 bytes of `kvm_regs`) set to `rip`.
fn sync_point_at(landmark: u64, rip: u64) -> Record {
    let Record::SyncPoint { cpu, vmm_state, .. } = &sample_records()[9] else {
        unreachable!("the sample's sync point")
    };
    let mut cpu = cpu.clone();
    cpu.regs[..8].copy_from_slice(&rip.to_le_bytes());
    Record::SyncPoint {
        landmark,
        cpu,
        vmm_state: vmm_state.clone(),
        pages: vec![],
    }
}

#[test]
fn states_after_the_first_go_as_deltas_and_need_their_base() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let records = vec![
        sync_point_at(2, 0x1000),
        sync_point_at(3, 0x2000),
        sync_point_at(4, 0x2008),
    ];
    let mut ends = vec![w.written().0];
    for r in &records {
        w.append(r).unwrap();
        ends.push(w.written().0);
    }
    let stats = w.state_stats();
    assert_eq!((stats.whole, stats.delta), (1, 2));
    // Frame, landmark, form, base CRC, one run of a byte or two, and an
    // empty page block.
    let last = ends[3] - ends[2];
    assert!(last < 50, "a delta sync point of {last} bytes");
    let bytes = w.into_inner();
    assert_eq!(read_all(&bytes).unwrap().1, records);

    // A stream that starts after the first sync point has no base.
    let mut d = RecordDecoder::new(&header());
    d.push(&bytes[ends[1] as usize..]);
    let err = d.next_record().unwrap_err().to_string();
    assert!(
        err.contains("vCPU state") && err.contains("holds none"),
        "{err}"
    );
}

#[test]
fn a_sync_point_refused_by_the_limit_leaves_the_state_base_as_readers_have_it() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let first = sync_point_at(2, 0x1000);
    w.append(&first).unwrap();
    w.set_limit(Some(w.written().0 + 10));
    let err = w.append(&sync_point_at(3, 0x2000)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    w.set_limit(None);
    let third = sync_point_at(4, 0x3000);
    w.append(&third).unwrap();
    assert_eq!(w.state_stats().delta, 1);
    let (_, records) = read_all(&w.into_inner()).unwrap();
    assert_eq!(records, vec![first, third]);
}

#[test]
fn version_4_sync_points_still_read() {
    let mut out = log_start(4);
    for landmark in [5u64, 6] {
        let mut e = Enc::default();
        e.u64(landmark);
        for (fill, len) in [(1u8, 144), (2, 312), (3, 416), (4, 64), (5, 24)] {
            e.bytes(&vec![fill; len]);
        }
        e.packed(&[6; 4096]);
        e.bytes(&[7, 8]);
        // One page entry: page 1 (step zigzag(1) = 2), all zero.
        e.u32(1);
        e.u32(16);
        e.packed(&[2, 1]);
        write_frame(&mut out, KIND_SYNC_POINT, &e.finish().unwrap()).unwrap();
    }
    let (_, records) = read_all(&out).unwrap();
    assert_eq!(records.len(), 2);
    for (r, landmark) in records.iter().zip([5, 6]) {
        let Record::SyncPoint {
            landmark: l,
            cpu,
            vmm_state,
            pages,
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(*l, landmark);
        assert_eq!((cpu.regs.len(), cpu.msrs[0], cpu.xsave[4095]), (144, 5, 6));
        assert_eq!(vmm_state, &[7, 8]);
        assert_eq!(pages, &vec![(PAGE_SIZE as u64, PageData::zero())]);
    }
}

#[test]
fn sync_points_from_borrowed_pages_are_the_same_bytes_as_from_records() {
    let h = LogHeader {
        mem_bytes: 1 << 30,
        ..header()
    };
    let mut from_records = LogWriter::new(Vec::new(), &h).unwrap();
    let mut from_slices = LogWriter::new(Vec::new(), &h).unwrap();
    // Whole, then deltas, unchanged and zero pages; the last one split.
    let rounds = [
        noisy_pages(5, 1),
        noisy_pages(7, 2),
        noisy_pages(7, 2),
        vec![
            (0x2000, PageData::zero()),
            (0x9000, vec![3; PAGE_SIZE].into()),
        ],
        noisy_pages(MAX_PAGES_PER_RECORD + 2, 5),
    ];
    for (i, pages) in rounds.into_iter().enumerate() {
        let landmark = 2 + i as u64;
        let cpu = CpuStateBytes {
            regs: vec![i as u8; 144],
            ..CpuStateBytes::default()
        };
        let borrowed: Vec<(u64, &[u8])> = pages.iter().map(|(g, d)| (*g, &d[..])).collect();
        from_slices
            .append_sync_point(landmark, &cpu, &[i as u8], &borrowed)
            .unwrap();
        from_records
            .append(&Record::SyncPoint {
                landmark,
                cpu: Box::new(cpu),
                vmm_state: vec![i as u8],
                pages,
            })
            .unwrap();
        assert_eq!(from_slices.page_stats(), from_records.page_stats());
    }
    assert_eq!(from_slices.into_inner(), from_records.into_inner());
    // Pages the caller found unchanged (holds_page) need no copy and give
    // the same bytes; one the cache does not hold is refused, writing
    // nothing.
    let mut with_copies = LogWriter::new(Vec::new(), &h).unwrap();
    let mut without = LogWriter::new(Vec::new(), &h).unwrap();
    let cpu = CpuStateBytes::default();
    for (landmark, word) in [(2, 1), (3, 1), (4, 2)] {
        let pages = noisy_pages(4, word);
        let marked: Vec<(u64, SyncPage)> = pages
            .iter()
            .map(|(gpa, data)| {
                let page = if without.holds_page(*gpa, data) {
                    SyncPage::Unchanged
                } else {
                    SyncPage::Contents(data)
                };
                (*gpa, page)
            })
            .collect();
        assert_eq!(
            marked
                .iter()
                .filter(|(_, p)| matches!(p, SyncPage::Unchanged))
                .count(),
            if landmark == 3 { 4 } else { 0 }
        );
        without
            .append_sync_point(landmark, &cpu, &[], &marked)
            .unwrap();
        with_copies.append(&sync_point(landmark, pages)).unwrap();
    }
    let before = without.written();
    let uncached = [(0x40_0000u64, SyncPage::Unchanged)];
    let err = without
        .append_sync_point(5, &cpu, &[], &uncached)
        .unwrap_err();
    assert!(err.to_string().contains("has no copy of it"), "{err}");
    assert_eq!(without.written(), before);
    assert_eq!(without.into_inner(), with_copies.into_inner());
    // A page listed twice is refused in any order.
    let mut w = LogWriter::new(Vec::new(), &h).unwrap();
    let page = vec![1u8; PAGE_SIZE];
    let twice: Vec<(u64, &[u8])> = vec![(0x3000, &page), (0x1000, &page), (0x3000, &page)];
    let err = w
        .append_sync_point(9, &CpuStateBytes::default(), &[], &twice)
        .unwrap_err();
    assert!(err.to_string().contains("0x3000 appears twice"), "{err}");
}

#[test]
fn logs_older_than_the_interrupt_window_rule_are_read_but_not_replayed() {
    let ours = encoded();
    let reader = LogReader::new(ours.as_slice()).unwrap();
    assert_eq!(reader.version(), LOG_VERSION);
    reader.check_replayable().unwrap();
    for old in OLDEST_LOG_VERSION..OLDEST_REPLAYABLE_LOG_VERSION {
        let mut bytes = log_start(old);
        bytes.extend_from_slice(&ours[log_start(LOG_VERSION).len()..]);
        let reader = LogReader::new(bytes.as_slice()).unwrap();
        assert_eq!(reader.version(), old);
        let err = reader.check_replayable().unwrap_err();
        assert!(
            matches!(err, LogError::NotReplayable(v) if v == old),
            "{err}"
        );
        assert!(err.to_string().contains("interrupt-window"), "{err}");
    }
}

#[test]
fn the_tick_delivery_travels_in_the_header_and_a_bad_one_is_refused() {
    for rule in [
        TickDelivery::CatchUpAtWindowExits,
        TickDelivery::AtWindowExits,
    ] {
        let h = LogHeader {
            tick_delivery: rule,
            ..header()
        };
        let bytes = h.encode().unwrap();
        assert_eq!(LogHeader::decode(&bytes).unwrap().tick_delivery, rule);
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() = 3;
        let err = LogHeader::decode(&bad).unwrap_err();
        assert!(err.to_string().contains("tick delivery 3"), "{err}");
        let (read, _) = read_all(&LogWriter::new(Vec::new(), &h).unwrap().into_inner()).unwrap();
        assert_eq!(read.tick_delivery, rule);
    }
    // Older formats have no byte: they delivered ticks at landmarks.
    let (old, _) = read_all(&log_start(5)).unwrap();
    assert_eq!(old.tick_delivery, TickDelivery::AtLandmarks);
}

/// A frame built in place (in a reused buffer, the LZ4 block compressed
/// straight into it) has the bytes of one built field by field and then
/// framed: the log's bytes do not depend on how its buffers are kept.
#[test]
fn frames_built_in_reused_buffers_are_byte_identical() {
    let mut noisy = vec![0u8; 3 * PAGE_SIZE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noisy.iter_mut().skip(PAGE_SIZE) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut reused = vec![0xee; 5 * PAGE_SIZE];
    for data in [&noisy[..], &noisy[..10], &[][..]] {
        let mut plain = Vec::new();
        plain.extend_from_slice(&42u64.to_le_bytes());
        plain.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let block = lz4_flex::block::compress(data);
        plain.extend_from_slice(&(block.len() as u32).to_le_bytes());
        plain.extend_from_slice(&block);
        let mut expected = Vec::new();
        write_frame(&mut expected, KIND_SYNC_PAGES, &plain).unwrap();

        let mut e = Enc::frame(std::mem::take(&mut reused));
        e.u64(42);
        e.packed(data);
        let frame = e.finish_frame(KIND_SYNC_PAGES).unwrap();
        assert_eq!(frame, expected, "{} bytes packed", data.len());
        reused = frame;
    }
}

/// A `SyncState` frame's payload for landmark 5 with this device-write flag
/// and devices' state.
fn sync_state_payload(flag: u8, devices: &[u8]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(5);
    e.u64(2);
    e.u64(1000);
    e.raw(&[1; 32]);
    e.raw(&[2; 16]);
    e.u8(flag);
    e.packed(devices);
    // An empty page block: no pages, the default cache.
    e.u32(0);
    e.u32(DEFAULT_PAGE_CACHE_PAGES);
    e.packed(&[]);
    e.finish().unwrap()
}

#[test]
fn sync_states_are_checked_and_refused_in_logs_older_than_format_7() {
    // A good one reads back.
    let mut bytes = log_start(LOG_VERSION);
    write_frame(&mut bytes, KIND_SYNC_STATE, &sync_state_payload(0, b"{}")).unwrap();
    let (_, records) = read_all(&bytes).unwrap();
    assert!(
        matches!(&records[0], Record::SyncState { landmark: 5, state }
        if state.clock == 1000 && state.since == 2 && !state.device_unflushed
            && state.devices == b"{}" && state.pages.is_empty())
    );
    // One that claims to cover pages from a later landmark than its own.
    let mut payload = sync_state_payload(0, b"{}");
    payload[8..16].copy_from_slice(&9u64.to_le_bytes());
    let mut bytes = log_start(LOG_VERSION);
    write_frame(&mut bytes, KIND_SYNC_STATE, &payload).unwrap();
    let err = read_all(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("previous sync point with state, 9, is not before it"),
        "{err}"
    );
    // A flag that is neither 0 nor 1.
    let mut bytes = log_start(LOG_VERSION);
    write_frame(&mut bytes, KIND_SYNC_STATE, &sync_state_payload(2, b"{}")).unwrap();
    let err = read_all(&bytes).unwrap_err().to_string();
    assert!(err.contains("device-write flag 2"), "{err}");
    // Devices' state claiming more than the limit unpacked.
    let mut payload = sync_state_payload(1, b"{}");
    // After landmark, since, clock, the two signatures and the flag.
    let at = 8 + 8 + 8 + 32 + 16 + 1;
    payload[at..at + 4].copy_from_slice(&(MAX_DEVICES_STATE as u32 + 1).to_le_bytes());
    let mut bytes = log_start(LOG_VERSION);
    write_frame(&mut bytes, KIND_SYNC_STATE, &payload).unwrap();
    let err = read_all(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("devices' state") && err.contains("more than"),
        "{err}"
    );
    // Format 6 has no such record.
    let mut bytes = log_start(6);
    write_frame(&mut bytes, KIND_SYNC_STATE, &sync_state_payload(0, b"{}")).unwrap();
    let err = read_all(&bytes).unwrap_err().to_string();
    assert!(err.contains("unknown record kind 0x23"), "{err}");
    // The writer refuses devices' state the reader would.
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let err = w
        .append(&Record::SyncState {
            landmark: 5,
            state: Box::new(ResumeState {
                devices: vec![b' '; MAX_DEVICES_STATE + 1],
                ..sample_sync_state()
            }),
        })
        .unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}
