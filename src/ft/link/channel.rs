//! What both endpoints share: frame assembly from the byte stream, the
//! `arbiter::auth` handshake, sealing and opening (the only place the
//! Sealer/Opener are used), liveness timers and counters.

use std::collections::VecDeque;
use std::time::Duration;

use arbiter::auth::{Initiator, Key, Responder, Session, MAX_HANDSHAKE_FRAME, MESSAGE3_LEN};

use super::{CloseReason, LinkConfig, LinkStats, HANDSHAKE_LABEL};

/// `u32 length | body` frames cut out of a byte stream that arrives in
/// arbitrary pieces. A length over the limit is refused before anything is
/// allocated for the body.
#[derive(Debug, Default)]
pub(super) struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's body, `Ok(None)` if it has not fully arrived.
    pub fn next(&mut self, limit: u32) -> Result<Option<Vec<u8>>, CloseReason> {
        let avail = &self.buf[self.start..];
        let Some(len_bytes) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes"));
        if len > limit {
            return Err(CloseReason::FrameTooLarge { len, limit });
        }
        let Some(body) = avail.get(4..4 + len as usize) else {
            return Ok(None);
        };
        let body = body.to_vec();
        self.start += 4 + len as usize;
        Ok(Some(body))
    }

    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

enum Auth {
    /// Primary: message 1 sent, waiting for message 2.
    InitiatorSent(Initiator),
    /// Backup: waiting for message 1.
    ResponderWaiting(Key),
    /// Backup: message 2 sent, waiting for message 3.
    ResponderSent(Responder),
    Open(Box<Session>),
    Done,
}

/// Whether a timeout ended the link, and how.
pub(super) enum Expired {
    Handshake,
    PeerSilent,
}

pub(super) struct Channel {
    pub config: LinkConfig,
    auth: Auth,
    rx: FrameBuffer,
    tx: VecDeque<Vec<u8>>,
    created_at: Duration,
    last_rx: Duration,
    pub last_tx: Duration,
    established_at: Option<Duration>,
    closed: Option<CloseReason>,
    pub stats: LinkStats,
}

impl Channel {
    /// The primary's side: message 1 is queued at once.
    pub fn initiator(config: LinkConfig, key: &Key, now: Duration) -> Self {
        let (initiator, message1) = Initiator::start(key, HANDSHAKE_LABEL);
        let mut chan = Self::new(config, Auth::InitiatorSent(initiator), now);
        chan.tx.push_back(framed(&message1));
        chan
    }

    pub fn responder(config: LinkConfig, key: &Key, now: Duration) -> Self {
        Self::new(config, Auth::ResponderWaiting(key.clone()), now)
    }

    fn new(config: LinkConfig, auth: Auth, now: Duration) -> Self {
        Channel {
            config,
            auth,
            rx: FrameBuffer::default(),
            tx: VecDeque::new(),
            created_at: now,
            last_rx: now,
            last_tx: now,
            established_at: None,
            closed: None,
            stats: LinkStats::default(),
        }
    }

    pub fn closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    pub fn is_open(&self) -> bool {
        matches!(self.auth, Auth::Open(_))
    }

    /// The side finished its Hello exchange: from now on the peer timer runs.
    pub fn set_established(&mut self, now: Duration) {
        self.established_at = Some(now);
    }

    pub fn receive(&mut self, bytes: &[u8]) {
        if self.closed.is_none() {
            self.stats.wire_bytes_received += bytes.len() as u64;
            self.rx.extend(bytes);
        }
    }

    /// The next authenticated message plaintext, driving the handshake on
    /// the way. `None` when no complete frame is buffered or the link is closed.
    pub fn next_message(&mut self, now: Duration) -> Option<Vec<u8>> {
        loop {
            if self.closed.is_some() {
                return None;
            }
            let limit = if self.is_open() {
                self.config.max_frame_bytes
            } else {
                MAX_HANDSHAKE_FRAME
            };
            let body = match self.rx.next(limit) {
                Ok(Some(body)) => body,
                Ok(None) => return None,
                Err(reason) => {
                    self.close(reason, false);
                    return None;
                }
            };
            self.stats.frames_received += 1;
            match std::mem::replace(&mut self.auth, Auth::Done) {
                Auth::Open(mut session) => {
                    let opened = session.opener.open(&body);
                    self.auth = Auth::Open(session);
                    match opened {
                        Ok(message) => {
                            self.last_rx = now;
                            return Some(message);
                        }
                        Err(e) => self.close(CloseReason::Unauthenticated(e.to_string()), false),
                    }
                }
                Auth::InitiatorSent(initiator) => match initiator.finish(&body) {
                    Ok((message3, session)) => {
                        self.tx.push_back(framed(&message3));
                        self.auth = Auth::Open(Box::new(session));
                        self.last_rx = now;
                    }
                    Err(e) => {
                        // An unverifiable message 3, so the backup logs a key
                        // mismatch rather than a bare disconnect.
                        self.tx.clear();
                        self.tx.push_back(framed(&[0; MESSAGE3_LEN]));
                        self.close(CloseReason::Handshake(e.to_string()), true);
                    }
                },
                Auth::ResponderWaiting(key) => {
                    match Responder::respond(&key, HANDSHAKE_LABEL, &body) {
                        Ok((responder, message2)) => {
                            self.tx.push_back(framed(&message2));
                            self.auth = Auth::ResponderSent(responder);
                            self.last_rx = now;
                        }
                        Err(e) => self.close(CloseReason::Handshake(e.to_string()), false),
                    }
                }
                Auth::ResponderSent(responder) => match responder.finish(&body) {
                    Ok(session) => {
                        self.auth = Auth::Open(Box::new(session));
                        self.last_rx = now;
                    }
                    Err(e) => self.close(CloseReason::Handshake(e.to_string()), false),
                },
                Auth::Done => {}
            }
        }
    }

    /// Seals one message and queues its frame. Only called once open.
    pub fn send(&mut self, message: &[u8]) {
        if self.closed.is_some() {
            return;
        }
        if let Auth::Open(session) = &mut self.auth {
            let sealed = session.sealer.seal(message);
            self.tx.push_back(framed(&sealed));
        }
    }

    pub fn pop_transmit(&mut self, now: Duration) -> Option<Vec<u8>> {
        let frame = self.tx.pop_front()?;
        self.last_tx = now;
        self.stats.frames_sent += 1;
        self.stats.wire_bytes_sent += frame.len() as u64;
        Some(frame)
    }

    /// Ends the link. `flush`: frames already queued (a final message queued
    /// just before) still go out; otherwise nothing more is sent. Nothing
    /// received afterwards is processed.
    pub fn close(&mut self, reason: CloseReason, flush: bool) {
        if self.closed.is_some() {
            return;
        }
        match &reason {
            CloseReason::Local(_) => tracing::info!(%reason, "FT link closed"),
            _ => tracing::warn!(%reason, "FT link closed"),
        }
        if !flush {
            self.tx.clear();
        }
        self.rx.clear();
        self.closed = Some(reason);
        self.auth = Auth::Done;
    }

    /// This side could not run for `stalled` (its host overloaded): what
    /// the peer sent meanwhile may still sit in a buffer on the way, so that
    /// time does not count as the peer's silence. Returns the time credited.
    pub fn credit_local_stall(&mut self, stalled: Duration, now: Duration) -> Duration {
        if self.established_at.is_none() || self.closed.is_some() {
            return Duration::ZERO;
        }
        let credited = self
            .last_rx
            .saturating_add(stalled)
            .min(now)
            .saturating_sub(self.last_rx);
        if credited.is_zero() {
            return credited;
        }
        self.last_rx += credited;
        self.stats.local_stalls += 1;
        self.stats.longest_local_stall = self.stats.longest_local_stall.max(credited);
        credited
    }

    /// When the peer (or the handshake) is due to be given up on.
    pub fn deadline(&self) -> Option<Duration> {
        if self.closed.is_some() {
            return None;
        }
        Some(match self.established_at {
            None => self.created_at + self.config.handshake_timeout,
            Some(at) => self.last_rx.max(at) + self.config.peer_timeout,
        })
    }

    /// Ends the link if its deadline has passed.
    pub fn check_deadline(&mut self, now: Duration) -> Option<Expired> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        Some(match self.established_at {
            None => {
                self.close(
                    CloseReason::HandshakeTimeout(self.config.handshake_timeout),
                    false,
                );
                Expired::Handshake
            }
            Some(at) => {
                let silent_for = now - self.last_rx.max(at);
                self.close(CloseReason::PeerSilent { silent_for }, false);
                Expired::PeerSilent
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_assembled_across_arbitrary_splits() {
        let mut stream = Vec::new();
        for body in [&b"abc"[..], b"", &[7u8; 300]] {
            stream.extend_from_slice(&framed(body));
        }
        for split in 1..stream.len() {
            let mut fb = FrameBuffer::default();
            let mut got = Vec::new();
            for piece in stream.chunks(split) {
                fb.extend(piece);
                while let Some(body) = fb.next(1000).unwrap() {
                    got.push(body);
                }
            }
            assert_eq!(
                got,
                vec![b"abc".to_vec(), vec![], vec![7u8; 300]],
                "split {split}"
            );
        }
    }

    #[test]
    fn an_oversize_length_is_refused_before_its_body_arrives() {
        let mut fb = FrameBuffer::default();
        fb.extend(&u32::MAX.to_le_bytes());
        assert_eq!(
            fb.next(16),
            Err(CloseReason::FrameTooLarge {
                len: u32::MAX,
                limit: 16
            })
        );
    }
}
