//! Tests of the format-5 vCPU state encoding: whole and delta round trips,
//! wrong or missing bases, corrupted deltas, and random state sequences.

use proptest::prelude::*;

use super::*;

/// A state shaped like KVM's: the structs' sizes, a few MSRs, the XSAVE
/// area mostly zero.
fn state(seed: u8) -> (CpuStateBytes, Vec<u8>) {
    let fill = |n: usize, k: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k))
            .collect()
    };
    let mut xsave = vec![0u8; XSAVE_BYTES];
    xsave[..512].copy_from_slice(&fill(512, seed));
    (
        CpuStateBytes {
            regs: fill(144, seed),
            sregs: fill(312, 1),
            fpu: fill(416, 2),
            events: vec![0; 64],
            msrs: fill(12 * 20, 3),
            xsave,
        },
        vec![0; 26],
    )
}

fn send(encoder: &mut StateEncoder, s: &(CpuStateBytes, Vec<u8>)) -> Vec<u8> {
    let encoded = encoder.encode(&s.0, &s.1).expect("encodes");
    let bytes = encoded.bytes.clone();
    encoder.commit(encoded);
    bytes
}

fn receive(decoder: &mut StateDecoder, bytes: &[u8]) -> Result<(CpuStateBytes, Vec<u8>), String> {
    let mut d = Dec(bytes);
    let state = decoder.decode(&mut d)?;
    d.finish()?;
    Ok(state)
}

#[test]
fn the_first_state_is_whole_and_the_next_a_small_delta() {
    let mut encoder = StateEncoder::default();
    let mut decoder = StateDecoder::default();
    let first = state(0);
    let bytes = send(&mut encoder, &first);
    assert_eq!(bytes[0], FORM_WHOLE);
    assert_eq!(receive(&mut decoder, &bytes).unwrap(), first);

    // A CPU-bound loop between two ticks: RIP and two registers changed.
    let mut second = first.clone();
    second.0.regs[0..8].copy_from_slice(&0x1234_5678_u64.to_le_bytes());
    second.0.regs[128..136].copy_from_slice(&0x40_1000_u64.to_le_bytes());
    let bytes = send(&mut encoder, &second);
    assert_eq!(bytes[0], FORM_DELTA);
    assert!(bytes.len() < 40, "{} bytes", bytes.len());
    assert_eq!(receive(&mut decoder, &bytes).unwrap(), second);

    // Nothing changed at all: a delta of no runs.
    let same = send(&mut encoder, &second);
    assert_eq!(same, [&[FORM_DELTA][..], &same[1..5], &[0]].concat());
    assert_eq!(receive(&mut decoder, &same).unwrap(), second);
    let whole = encoder.stats().bytes - bytes.len() as u64 - same.len() as u64;
    assert_eq!(
        (encoder.stats().whole, encoder.stats().delta),
        (1, 2),
        "{whole} bytes whole"
    );
    assert!(whole < 2000, "the whole state packs: {whole} bytes");
}

#[test]
fn a_state_of_another_shape_or_mostly_changed_goes_whole() {
    let mut encoder = StateEncoder::default();
    let mut decoder = StateDecoder::default();
    let first = state(0);
    receive(&mut decoder, &send(&mut encoder, &first)).unwrap();
    // One more MSR: the image's length changes.
    let mut more = first.clone();
    more.0.msrs.extend_from_slice(&[9; 12]);
    let bytes = send(&mut encoder, &more);
    assert_eq!(bytes[0], FORM_WHOLE);
    assert_eq!(receive(&mut decoder, &bytes).unwrap(), more);
    // Every byte of every register different: whole packs smaller.
    let mut other = more.clone();
    for b in other.0.regs.iter_mut().chain(&mut other.0.sregs) {
        *b = !*b;
    }
    for (i, b) in other.0.xsave.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let bytes = send(&mut encoder, &other);
    assert_eq!(receive(&mut decoder, &bytes).unwrap(), other);
}

#[test]
fn a_delta_without_its_base_is_an_error_naming_both_crcs() {
    let mut encoder = StateEncoder::default();
    let first = state(0);
    let whole = send(&mut encoder, &first);
    let mut second = first.clone();
    second.0.regs[0] ^= 1;
    let delta = send(&mut encoder, &second);

    // A reader that missed the whole state (a stream started mid-way).
    let err = receive(&mut StateDecoder::default(), &delta).unwrap_err();
    assert!(err.contains("holds none"), "{err}");

    // A reader whose base is another state.
    let mut decoder = StateDecoder::default();
    receive(&mut decoder, &send(&mut StateEncoder::default(), &state(7))).unwrap();
    let err = receive(&mut decoder, &delta).unwrap_err();
    let want = format!(
        "{:#010x}",
        u32::from_le_bytes(delta[1..5].try_into().unwrap())
    );
    assert!(err.contains(&want) && err.contains("out of step"), "{err}");

    // The right base still decodes it.
    let mut decoder = StateDecoder::default();
    receive(&mut decoder, &whole).unwrap();
    assert_eq!(receive(&mut decoder, &delta).unwrap(), second);
}

#[test]
fn corrupted_states_are_clear_errors() {
    let mut encoder = StateEncoder::default();
    let first = state(0);
    let whole = send(&mut encoder, &first);
    let base = || {
        let mut decoder = StateDecoder::default();
        receive(&mut decoder, &whole).unwrap();
        decoder
    };
    let crc = crc32fast::hash(&image(&first.0, &first.1).unwrap()).to_le_bytes();
    let delta = |runs: &[u8]| [&[FORM_DELTA][..], &crc, runs].concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![7], "unknown vCPU state form 7"),
        // A run past the end of the image.
        (delta(&[1, 0xff, 0x7f, 2, 1, 2]), "does not fit"),
        // A run that claims more bytes than follow.
        (delta(&[1, 0, 9, 1]), "ends"),
        // An empty run.
        (delta(&[1, 4, 0]), "run of 0 bytes"),
        // A delta that turns a length prefix into nonsense.
        (
            delta(&[1, 0, 4, 0xff, 0xff, 0, 0]),
            "vCPU state: payload ends",
        ),
    ];
    for (bytes, expect) in cases {
        let err = receive(&mut base(), &bytes).unwrap_err();
        assert!(err.contains(expect), "{bytes:?}: {err}");
    }
    // A whole state claiming more than any state may take.
    let mut e = Enc::default();
    e.u8(FORM_WHOLE);
    e.u32(MAX_STATE_BYTES as u32 + 1);
    e.bytes(&[0; 8]);
    let err = receive(&mut base(), &e.finish().unwrap()).unwrap_err();
    assert!(err.contains("more than this field may hold"), "{err}");
}

#[test]
fn the_writer_refuses_what_a_reader_would() {
    let (mut cpu, vmm) = state(0);
    cpu.xsave = vec![0; XSAVE_BYTES + 1];
    let err = StateEncoder::default().encode(&cpu, &vmm).err().unwrap();
    assert!(err.contains("XSAVE area of 4097 bytes"), "{err}");
    let (mut cpu, vmm) = state(0);
    cpu.msrs = vec![0; MAX_STATE_BYTES];
    let err = StateEncoder::default().encode(&cpu, &vmm).err().unwrap();
    assert!(err.contains("more than 65536"), "{err}");
}

/// Changes to a state: (part, offset, byte); parts as in the image.
fn changes() -> impl Strategy<Value = Vec<Vec<(usize, usize, u8)>>> {
    prop::collection::vec(
        prop::collection::vec((0usize..7, 0usize..4096, any::<u8>()), 0..24),
        1..10,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever changes between sync points (sometimes an MSR more or
    /// less): every reader gets exactly the writer's states.
    #[test]
    fn random_state_sequences_round_trip(changes in changes(), seed in any::<u8>()) {
        let mut encoder = StateEncoder::default();
        let mut decoder = StateDecoder::default();
        let (mut cpu, mut vmm) = state(seed);
        for round in changes {
            for (part, at, byte) in round {
                let bytes = match part {
                    0 => &mut cpu.regs,
                    1 => &mut cpu.sregs,
                    2 => &mut cpu.fpu,
                    3 => &mut cpu.events,
                    4 => &mut cpu.msrs,
                    5 => &mut cpu.xsave,
                    _ => &mut vmm,
                };
                if part == 4 && byte == 0 {
                    bytes.truncate(bytes.len().saturating_sub(12));
                } else if part == 4 && byte == 1 {
                    bytes.extend_from_slice(&[byte; 12]);
                } else if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = byte;
                }
            }
            let sent = send(&mut encoder, &(cpu.clone(), vmm.clone()));
            prop_assert_eq!(receive(&mut decoder, &sent).unwrap(), (cpu.clone(), vmm.clone()));
        }
    }

    /// Any bytes after a valid base: an error or a state, never a panic.
    #[test]
    fn arbitrary_deltas_never_panic(runs in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut encoder = StateEncoder::default();
        let first = state(0);
        let mut decoder = StateDecoder::default();
        receive(&mut decoder, &send(&mut encoder, &first)).unwrap();
        let crc = crc32fast::hash(&image(&first.0, &first.1).unwrap()).to_le_bytes();
        let bytes = [&[FORM_DELTA][..], &crc, &runs].concat();
        let _ = receive(&mut decoder, &bytes);
    }
}
