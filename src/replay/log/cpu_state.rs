//! The vCPU state of a sync point in format 5 (docs/log-format.md, "vCPU
//! state"), sans-IO.
//!
//! A sync point's vCPU and VMM state is one byte string, its *image*; it
//! travels whole (LZ4-packed) or as a sparse XOR delta against the image
//! of the previous sync point of the same log or stream, whichever is
//! smaller. Between two sync points of a CPU-bound guest only a few
//! registers change, so a delta is tens of bytes where the whole state is
//! about 1.5 KB. The writer and every reader keep the previous image in
//! step (each starts without one: the first state of a log, of a live
//! stream and of a clone's stream is whole), and a delta names its base by
//! CRC-32, so a reader holding another base gets an error, never a wrong
//! state.

use super::codec::{Dec, Enc};
use super::delta::{apply_runs, encode_runs};
use super::CpuStateBytes;

/// Size of `kvm_xsave`: the only XSAVE area size a sync point carries.
pub(super) const XSAVE_BYTES: usize = 4096;
/// Largest state image (the real one is about 5.6 KB: 4 KiB of XSAVE, the
/// KVM structs, a few dozen MSRs); a reader refuses a larger one before
/// allocating it, and the writer never logs one.
pub(super) const MAX_STATE_BYTES: usize = 64 << 10;

/// How the state travels.
const FORM_WHOLE: u8 = 0;
const FORM_DELTA: u8 = 1;

/// The previous sync point's image and its CRC-32.
struct Base {
    image: Vec<u8>,
    crc: u32,
}

/// How vCPU states travelled (the writer's count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    /// States sent whole.
    pub whole: u64,
    /// States sent as a delta against the previous one.
    pub delta: u64,
    /// Bytes of log their encodings took.
    pub bytes: u64,
}

/// `regs, sregs, fpu, events, msrs, xsave, vmm_state`, each as `u32 length
/// + bytes`.
fn image(cpu: &CpuStateBytes, vmm_state: &[u8]) -> Result<Vec<u8>, String> {
    if cpu.xsave.len() > XSAVE_BYTES {
        return Err(format!("an XSAVE area of {} bytes", cpu.xsave.len()));
    }
    let mut e = Enc::default();
    for part in [
        &cpu.regs[..],
        &cpu.sregs,
        &cpu.fpu,
        &cpu.events,
        &cpu.msrs,
        &cpu.xsave,
        vmm_state,
    ] {
        e.bytes(part);
    }
    let image = e.finish()?;
    if image.len() > MAX_STATE_BYTES {
        return Err(format!(
            "a vCPU state of {} bytes, more than {MAX_STATE_BYTES}",
            image.len()
        ));
    }
    Ok(image)
}

/// Inverse of [`image`].
fn parse_image(image: &[u8]) -> Result<(CpuStateBytes, Vec<u8>), String> {
    let mut d = Dec(image);
    let cpu = CpuStateBytes {
        regs: d.bytes()?,
        sregs: d.bytes()?,
        fpu: d.bytes()?,
        events: d.bytes()?,
        msrs: d.bytes()?,
        xsave: d.bytes()?,
    };
    let vmm_state = d.bytes()?;
    d.finish()?;
    if cpu.xsave.len() > XSAVE_BYTES {
        return Err(format!("an XSAVE area of {} bytes", cpu.xsave.len()));
    }
    Ok((cpu, vmm_state))
}

/// One sync point's state, encoded against the writer's base: the bytes to
/// log, and the image that becomes the base once they are written.
pub(super) struct EncodedState {
    pub(super) bytes: Vec<u8>,
    image: Vec<u8>,
    delta: bool,
}

/// The writer's side: the image of the last sync point it wrote.
#[derive(Default)]
pub(super) struct StateEncoder {
    base: Option<Base>,
    stats: StateStats,
}

impl StateEncoder {
    /// Encode a state against the base, the smaller of whole and delta.
    /// The base is not changed; [`StateEncoder::commit`] once written.
    pub(super) fn encode(
        &self,
        cpu: &CpuStateBytes,
        vmm_state: &[u8],
    ) -> Result<EncodedState, String> {
        let image = image(cpu, vmm_state)?;
        let mut whole = Enc::default();
        whole.u8(FORM_WHOLE);
        whole.packed(&image);
        let whole = whole.finish()?;
        if let Some(base) = self.base.as_ref().filter(|b| b.image.len() == image.len()) {
            let mut delta = vec![FORM_DELTA];
            delta.extend_from_slice(&base.crc.to_le_bytes());
            let limit = whole.len().saturating_sub(delta.len());
            if encode_runs(&base.image, &image, limit, &mut delta).is_some()
                && delta.len() < whole.len()
            {
                return Ok(EncodedState {
                    bytes: delta,
                    image,
                    delta: true,
                });
            }
        }
        Ok(EncodedState {
            bytes: whole,
            image,
            delta: false,
        })
    }

    /// The state was written: it is every reader's base from now on.
    pub(super) fn commit(&mut self, state: EncodedState) {
        if state.delta {
            self.stats.delta += 1;
        } else {
            self.stats.whole += 1;
        }
        self.stats.bytes += state.bytes.len() as u64;
        let crc = crc32fast::hash(&state.image);
        self.base = Some(Base {
            image: state.image,
            crc,
        });
    }

    pub(super) fn stats(&self) -> StateStats {
        self.stats
    }
}

/// A reader's side: the image of the last sync point it decoded.
#[derive(Default)]
pub(super) struct StateDecoder {
    base: Option<Base>,
}

impl StateDecoder {
    /// Inverse of [`StateEncoder::encode`]; the decoded state becomes the
    /// base. A delta against a base this reader does not hold is an error.
    pub(super) fn decode(&mut self, d: &mut Dec) -> Result<(CpuStateBytes, Vec<u8>), String> {
        let image = match d.u8()? {
            FORM_WHOLE => d
                .packed(MAX_STATE_BYTES)
                .map_err(|e| format!("vCPU state: {e}"))?,
            FORM_DELTA => {
                let crc = d.u32()?;
                let mut image = match &self.base {
                    Some(base) if base.crc == crc => base.image.clone(),
                    held => {
                        return Err(format!(
                            "the vCPU state is sent as a delta against a state with CRC {crc:#010x}, but this reader holds {}: the states are out of step",
                            match held {
                                Some(base) => format!("CRC {:#010x}", base.crc),
                                None => "none (the first state of a log or stream is whole)"
                                    .to_string(),
                            }
                        ))
                    }
                };
                apply_runs(d, &mut image, 0).map_err(|e| format!("vCPU state delta: {e}"))?;
                image
            }
            other => return Err(format!("unknown vCPU state form {other}")),
        };
        let state = parse_image(&image).map_err(|e| format!("vCPU state: {e}"))?;
        let crc = crc32fast::hash(&image);
        self.base = Some(Base { image, crc });
        Ok(state)
    }
}

#[cfg(test)]
#[path = "cpu_state_tests.rs"]
mod tests;
