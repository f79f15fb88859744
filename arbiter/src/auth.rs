//! Pre-shared-key authentication for framed byte streams: the arbiter's client
//! and peer connections, and the twinvm logging channel between primary and
//! backup. Both ends hold the same 256-bit [`Key`]; nobody without it can
//! complete a handshake or produce a frame the other end accepts.
//!
//! The core here is sans-IO (bytes in, bytes out); [`stream`] has blocking
//! helpers for `Read + Write` streams on top of [`crate::frame`].
//!
//! Handshake (three messages, HMAC-SHA256, fresh nonces from both sides):
//!
//! ```text
//! 1. I → R  nonce_i (32 bytes)
//! 2. R → I  nonce_r (32) || HMAC(key, "responder" || L || nonce_i || nonce_r)
//! 3. I → R  HMAC(key, "initiator" || L || nonce_i || nonce_r)
//! where L = u64 LE length of the protocol label || label
//! ```
//!
//! Each direction then gets its own session key,
//! `HMAC(key, "key i->r" || L || nonce_i || nonce_r)` and `"key r->i"`, and
//! every frame carries `HMAC(session key, u64 LE sequence number || payload)`.
//! The sequence number is implicit (both ends count), so a replayed, reordered,
//! dropped or reflected frame, or one from another connection or protocol,
//! fails to verify. Authenticity and integrity only: payloads are not encrypted.

mod key;
mod stream;

use std::fmt;
use std::io;
use std::path::PathBuf;

use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

pub use key::Key;
pub use stream::{
    handshake_initiator, handshake_responder, handshake_responder_after, read_opened, write_sealed,
    StreamError, MAX_HANDSHAKE_FRAME,
};

/// Length of a [`Key`] in bytes (256 bits).
pub const KEY_LEN: usize = 32;
/// Length of each side's handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a handshake MAC and of a frame tag (full HMAC-SHA256 output).
pub const TAG_LEN: usize = 32;
/// Length of handshake message 1, 2 and 3.
pub const MESSAGE1_LEN: usize = NONCE_LEN;
pub const MESSAGE2_LEN: usize = NONCE_LEN + TAG_LEN;
pub const MESSAGE3_LEN: usize = TAG_LEN;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A handshake MAC did not verify: the other side has another key, or the
    /// message was changed on the way.
    #[error("wrong key or tampered message")]
    WrongKey,
    #[error("malformed handshake message ({len} bytes, expected {expected}){}", said(.text))]
    MalformedHandshake {
        len: usize,
        expected: usize,
        /// The message as text when it was printable (e.g. a plain-text refusal
        /// from a peer that does not speak this handshake).
        text: Option<String>,
    },
    #[error("frame {seq} failed authentication: tampered, replayed, reordered, reflected or not sealed by this session's peer")]
    BadFrame { seq: u64 },
    #[error("sealed frame of {len} bytes is shorter than its {TAG_LEN}-byte tag")]
    ShortFrame { len: usize },
    #[error("session refuses further frames after an authentication failure")]
    Poisoned,
    #[error("session exhausted its 2^64 frame sequence numbers")]
    Exhausted,
    #[error("invalid key: {0}")]
    KeyFormat(String),
    #[error("key file {}: {error}", path.display())]
    KeyFileIo { path: PathBuf, error: io::Error },
    #[error("key file {}: {reason}", path.display())]
    KeyFileInvalid { path: PathBuf, reason: String },
}

fn said(text: &Option<String>) -> String {
    match text {
        Some(t) => format!("; the other side sent {t:?}"),
        None => String::new(),
    }
}

impl Key {
    /// HMAC over the handshake transcript for one purpose (`domain`).
    fn transcript_mac(
        &self,
        domain: &[u8],
        label: &str,
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
    ) -> HmacSha256 {
        let mut mac = keyed(&self.0);
        mac.update(domain);
        // The label's length first, so no two (label, nonces) inputs share bytes.
        mac.update(&(label.len() as u64).to_le_bytes());
        mac.update(label.as_bytes());
        mac.update(nonce_i);
        mac.update(nonce_r);
        mac
    }

    fn session(
        &self,
        label: &str,
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
        role: Role,
    ) -> Session {
        let derive = |domain: &[u8]| {
            let k = self
                .transcript_mac(domain, label, nonce_i, nonce_r)
                .finalize()
                .into_bytes();
            keyed(&k)
        };
        let i_to_r = derive(b"key i->r");
        let r_to_i = derive(b"key r->i");
        let (send, recv) = match role {
            Role::Initiator => (i_to_r, r_to_i),
            Role::Responder => (r_to_i, i_to_r),
        };
        Session {
            sealer: Sealer { mac: send, seq: 0 },
            opener: Opener {
                mac: recv,
                seq: 0,
                poisoned: false,
            },
        }
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn printable(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let ok = !text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || c == '\n' || c == '\t');
    ok.then(|| text.chars().take(200).collect())
}

fn check_len(message: &[u8], expected: usize) -> Result<(), AuthError> {
    if message.len() == expected {
        Ok(())
    } else {
        Err(AuthError::MalformedHandshake {
            len: message.len(),
            expected,
            text: printable(message),
        })
    }
}

#[derive(Clone, Copy)]
enum Role {
    Initiator,
    Responder,
}

/// The side that connects: sends message 1, checks message 2, sends message 3.
pub struct Initiator {
    key: Key,
    label: String,
    nonce_i: [u8; NONCE_LEN],
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a handshake for protocol `label`; returns message 1.
    pub fn start(key: &Key, label: &str) -> (Initiator, Vec<u8>) {
        let nonce_i = nonce();
        (
            Initiator {
                key: key.clone(),
                label: label.to_owned(),
                nonce_i,
            },
            nonce_i.to_vec(),
        )
    }

    /// Checks message 2; returns message 3 and the session.
    pub fn finish(self, message2: &[u8]) -> Result<(Vec<u8>, Session), AuthError> {
        check_len(message2, MESSAGE2_LEN)?;
        let (nonce_r, tag) = message2.split_at(NONCE_LEN);
        let nonce_r: [u8; NONCE_LEN] = nonce_r.try_into().expect("split at NONCE_LEN");
        self.key
            .transcript_mac(b"responder", &self.label, &self.nonce_i, &nonce_r)
            .verify_slice(tag)
            .map_err(|_| AuthError::WrongKey)?;
        let message3 = self
            .key
            .transcript_mac(b"initiator", &self.label, &self.nonce_i, &nonce_r)
            .finalize()
            .into_bytes()
            .to_vec();
        let session = self
            .key
            .session(&self.label, &self.nonce_i, &nonce_r, Role::Initiator);
        Ok((message3, session))
    }
}

/// The side that accepts: answers message 1 with message 2, checks message 3.
pub struct Responder {
    key: Key,
    label: String,
    nonce_i: [u8; NONCE_LEN],
    nonce_r: [u8; NONCE_LEN],
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// Answers message 1 for protocol `label`; returns message 2.
    pub fn respond(
        key: &Key,
        label: &str,
        message1: &[u8],
    ) -> Result<(Responder, Vec<u8>), AuthError> {
        check_len(message1, MESSAGE1_LEN)?;
        let nonce_i: [u8; NONCE_LEN] = message1.try_into().expect("length checked");
        let nonce_r = nonce();
        let tag = key
            .transcript_mac(b"responder", label, &nonce_i, &nonce_r)
            .finalize()
            .into_bytes();
        let mut message2 = Vec::with_capacity(MESSAGE2_LEN);
        message2.extend_from_slice(&nonce_r);
        message2.extend_from_slice(&tag);
        Ok((
            Responder {
                key: key.clone(),
                label: label.to_owned(),
                nonce_i,
                nonce_r,
            },
            message2,
        ))
    }

    /// Checks message 3; returns the session.
    pub fn finish(self, message3: &[u8]) -> Result<Session, AuthError> {
        check_len(message3, MESSAGE3_LEN)?;
        self.key
            .transcript_mac(b"initiator", &self.label, &self.nonce_i, &self.nonce_r)
            .verify_slice(message3)
            .map_err(|_| AuthError::WrongKey)?;
        Ok(self
            .key
            .session(&self.label, &self.nonce_i, &self.nonce_r, Role::Responder))
    }
}

/// Both directions of an authenticated connection.
#[derive(Debug)]
pub struct Session {
    pub sealer: Sealer,
    pub opener: Opener,
}

/// Seals outgoing frames: appends a tag over (this direction's sequence number, payload).
pub struct Sealer {
    /// Keyed with this direction's session key; cloned per frame.
    mac: HmacSha256,
    seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer").field("seq", &self.seq).finish()
    }
}

impl Sealer {
    /// `payload || tag` (tag: [`TAG_LEN`] bytes).
    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(&self.seq.to_le_bytes());
        mac.update(payload);
        // Wrapping is harmless: the opener refuses the 2^64th frame, so a reused
        // sequence number is never accepted.
        self.seq = self.seq.wrapping_add(1);
        let mut sealed = Vec::with_capacity(payload.len() + TAG_LEN);
        sealed.extend_from_slice(payload);
        sealed.extend_from_slice(&mac.finalize().into_bytes());
        sealed
    }
}

/// Opens incoming frames in order. After any failure it refuses everything:
/// the stream can no longer be trusted, and the caller should close it.
pub struct Opener {
    mac: HmacSha256,
    seq: u64,
    poisoned: bool,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("seq", &self.seq)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Opener {
    /// The payload of the next frame if its tag verifies (constant-time compare).
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if self.poisoned {
            return Err(AuthError::Poisoned);
        }
        if self.seq == u64::MAX {
            self.poisoned = true;
            return Err(AuthError::Exhausted);
        }
        let Some(payload_len) = sealed.len().checked_sub(TAG_LEN) else {
            self.poisoned = true;
            return Err(AuthError::ShortFrame { len: sealed.len() });
        };
        let (payload, tag) = sealed.split_at(payload_len);
        let mut mac = self.mac.clone();
        mac.update(&self.seq.to_le_bytes());
        mac.update(payload);
        if mac.verify_slice(tag).is_err() {
            self.poisoned = true;
            return Err(AuthError::BadFrame { seq: self.seq });
        }
        self.seq += 1;
        Ok(payload.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABEL: &str = "twinvm-test/1";

    fn handshake(ki: &Key, kr: &Key, li: &str, lr: &str) -> Result<(Session, Session), AuthError> {
        let (init, m1) = Initiator::start(ki, li);
        let (resp, m2) = Responder::respond(kr, lr, &m1)?;
        let (m3, si) = init.finish(&m2)?;
        let sr = resp.finish(&m3)?;
        Ok((si, sr))
    }

    fn pair() -> (Session, Session) {
        let k = Key::generate();
        handshake(&k, &k, LABEL, LABEL).unwrap()
    }

    #[test]
    fn round_trip_both_directions() {
        let (mut i, mut r) = pair();
        for n in 0..5u8 {
            let msg = vec![n; n as usize * 100];
            let sealed = i.sealer.seal(&msg);
            assert_eq!(sealed.len(), msg.len() + TAG_LEN);
            assert_eq!(r.opener.open(&sealed).unwrap(), msg);
            let back = r.sealer.seal(b"ack");
            assert_eq!(i.opener.open(&back).unwrap(), b"ack");
        }
        // Empty payloads are fine too.
        let sealed = i.sealer.seal(b"");
        assert_eq!(r.opener.open(&sealed).unwrap(), b"");
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The wire format of docs/arbiter.md, checked against values computed
    /// independently (Python's hmac/hashlib) from the documented formulas.
    #[test]
    fn known_answers_match_the_documented_format() {
        let key = Key(std::array::from_fn(|i| i as u8));
        let label = "twinvm-arbiter/1";
        let (nonce_i, nonce_r) = ([0x11u8; NONCE_LEN], [0x22u8; NONCE_LEN]);
        let responder_mac =
            unhex("afae96a8c8a97cb0000e94b3d24cc186c0ade50d80a0133e0eaf456fb40d9e59");
        let initiator_mac =
            unhex("35658b361f2cfb87c979f8944f3f94e42dee4d51c6469d390d98eb39ce3b84e7");

        let initiator = Initiator {
            key: key.clone(),
            label: label.into(),
            nonce_i,
        };
        let message2 = [&nonce_r[..], &responder_mac].concat();
        let (message3, mut si) = initiator.finish(&message2).unwrap();
        assert_eq!(message3, initiator_mac);
        let sealed = si.sealer.seal(b"hello");
        assert_eq!(&sealed[..5], b"hello");
        assert_eq!(
            sealed[5..],
            unhex("a0a9222272e684c399029476330467395a49bdd0665488ce333194b6ce512668")
        );

        let responder = Responder {
            key,
            label: label.into(),
            nonce_i,
            nonce_r,
        };
        let mut sr = responder.finish(&message3).unwrap();
        assert_eq!(sr.opener.open(&sealed).unwrap(), b"hello");
        sr.sealer.seal(b"x");
        let second = sr.sealer.seal(b"world");
        assert_eq!(
            second[5..],
            unhex("f3ef469b31faa02567932a6ea01e2272fb8b86da2c88e8b0c997f19b28d3564e")
        );
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (a, b) = (Key::generate(), Key::generate());
        // The initiator detects the responder's wrong key at message 2.
        let (init, m1) = Initiator::start(&a, LABEL);
        let (resp, m2) = Responder::respond(&b, LABEL, &m1).unwrap();
        assert!(matches!(init.finish(&m2), Err(AuthError::WrongKey)));
        // The responder detects the initiator's wrong key at message 3, even if a
        // forger reused a valid-looking message 3 from another run.
        let (init, m1) = Initiator::start(&a, LABEL);
        let (_resp2, m2_other) = Responder::respond(&a, LABEL, &m1).unwrap();
        let (m3_for_other, _) = init.finish(&m2_other).unwrap();
        assert!(matches!(
            resp.finish(&m3_for_other),
            Err(AuthError::WrongKey)
        ));
        assert_eq!(
            AuthError::WrongKey.to_string(),
            "wrong key or tampered message"
        );
    }

    #[test]
    fn any_tampered_handshake_byte_fails() {
        let k = Key::generate();
        for pos in 0..MESSAGE2_LEN {
            let (init, m1) = Initiator::start(&k, LABEL);
            let (_, mut m2) = Responder::respond(&k, LABEL, &m1).unwrap();
            m2[pos] ^= 0x01;
            assert!(
                matches!(init.finish(&m2), Err(AuthError::WrongKey)),
                "byte {pos}"
            );
        }
        for pos in 0..MESSAGE3_LEN {
            let (init, m1) = Initiator::start(&k, LABEL);
            let (resp, m2) = Responder::respond(&k, LABEL, &m1).unwrap();
            let (mut m3, _) = init.finish(&m2).unwrap();
            m3[pos] ^= 0x80;
            assert!(
                matches!(resp.finish(&m3), Err(AuthError::WrongKey)),
                "byte {pos}"
            );
        }
        // Message 1 changed on the way: the initiator rejects the answer.
        let (init, mut m1) = Initiator::start(&k, LABEL);
        m1[7] ^= 1;
        let (_, m2) = Responder::respond(&k, LABEL, &m1).unwrap();
        assert!(matches!(init.finish(&m2), Err(AuthError::WrongKey)));
    }

    #[test]
    fn any_tampered_frame_byte_fails() {
        let (mut i, _) = pair();
        let sealed = i.sealer.seal(b"test-and-set vm1");
        for pos in 0..sealed.len() {
            let (mut i, mut r) = pair();
            let mut s = i.sealer.seal(b"test-and-set vm1");
            s[pos] ^= 0x04;
            assert!(
                matches!(r.opener.open(&s), Err(AuthError::BadFrame { seq: 0 })),
                "byte {pos}"
            );
        }
    }

    #[test]
    fn replayed_frame_fails() {
        let (mut i, mut r) = pair();
        let f = i.sealer.seal(b"reset vm1");
        assert!(r.opener.open(&f).is_ok());
        assert!(matches!(
            r.opener.open(&f),
            Err(AuthError::BadFrame { seq: 1 })
        ));
        // Nor does a frame of another session with the same key open.
        let (mut i2, _) = pair();
        let (_, mut r3) = pair();
        assert!(r3.opener.open(&i2.sealer.seal(b"x")).is_err());
    }

    #[test]
    fn reordered_and_dropped_frames_fail() {
        let (mut i, mut r) = pair();
        let f0 = i.sealer.seal(b"first");
        let f1 = i.sealer.seal(b"second");
        assert!(matches!(
            r.opener.open(&f1),
            Err(AuthError::BadFrame { seq: 0 })
        ));
        // After a failure the opener stays closed, even for the genuine next frame.
        assert!(matches!(r.opener.open(&f0), Err(AuthError::Poisoned)));

        let (mut i, mut r) = pair();
        let _dropped = i.sealer.seal(b"first");
        let f1 = i.sealer.seal(b"second");
        assert!(r.opener.open(&f1).is_err());
    }

    #[test]
    fn reflected_frame_fails() {
        let (mut i, mut r) = pair();
        let f = i.sealer.seal(b"from initiator");
        // Fed back to the initiator itself: the two directions have different keys.
        assert!(matches!(
            i.opener.open(&f),
            Err(AuthError::BadFrame { seq: 0 })
        ));
        let g = r.sealer.seal(b"from responder");
        assert!(matches!(
            r.opener.open(&g),
            Err(AuthError::BadFrame { seq: 0 })
        ));
    }

    #[test]
    fn label_mismatch_fails_and_labels_separate_sessions() {
        let k = Key::generate();
        assert!(matches!(
            handshake(&k, &k, "twinvm-arbiter/1", "twinvm-ft-log/1"),
            Err(AuthError::WrongKey)
        ));
        // A prefix of a label is another label.
        assert!(handshake(&k, &k, "a", "ab").is_err());
        assert!(handshake(&k, &k, "", "").is_ok());
    }

    #[test]
    fn truncated_and_padded_handshake_messages_are_clean_errors() {
        let k = Key::generate();
        for len in [0, 1, MESSAGE1_LEN - 1, MESSAGE1_LEN + 1, 1000] {
            let err = Responder::respond(&k, LABEL, &vec![7u8; len]).unwrap_err();
            assert!(
                matches!(err, AuthError::MalformedHandshake { len: l, expected: MESSAGE1_LEN, .. } if l == len),
                "{err}"
            );
        }
        let (init, m1) = Initiator::start(&k, LABEL);
        let (resp, m2) = Responder::respond(&k, LABEL, &m1).unwrap();
        for len in 0..MESSAGE2_LEN {
            let (init, _) = Initiator::start(&k, LABEL);
            assert!(matches!(
                init.finish(&m2[..len]),
                Err(AuthError::MalformedHandshake { .. })
            ));
        }
        let (m3, _) = init.finish(&m2).unwrap();
        for len in 0..MESSAGE3_LEN {
            let (resp_b, _) = Responder::respond(&k, LABEL, &m1).unwrap();
            assert!(matches!(
                resp_b.finish(&m3[..len]),
                Err(AuthError::MalformedHandshake { .. })
            ));
        }
        assert!(resp.finish(&m3).is_ok());
        let err = Responder::respond(&k, LABEL, br#"{"Client":{"cluster_id":"x"}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"malformed handshake message (29 bytes, expected 32); the other side sent "{\"Client\":{\"cluster_id\":\"x\"}}""#
        );
    }

    #[test]
    fn short_frames_and_garbage_are_clean_errors() {
        let (_, mut r) = pair();
        assert!(matches!(
            r.opener.open(&[1, 2, 3]),
            Err(AuthError::ShortFrame { len: 3 })
        ));
        let (_, mut r) = pair();
        assert!(matches!(
            r.opener.open(&[0u8; TAG_LEN]),
            Err(AuthError::BadFrame { .. })
        ));
        let (_, mut r) = pair();
        assert!(r.opener.open(&[]).is_err());
    }
}
