//! Blocking helpers for stream users of [`crate::auth`]: the handshake and
//! sealed frames over [`crate::frame`]'s length-prefixed frames.
//!
//! Each handshake message is one frame. Timeouts are the caller's: set the
//! socket's read/write timeouts before calling, so a silent peer cannot hold
//! the handshake forever.

use std::io::{self, Read, Write};

use super::{AuthError, Initiator, Key, Opener, Responder, Sealer, Session, TAG_LEN};
use crate::frame::{read_frame, write_frame, FrameError};

/// Largest frame read during the handshake. Handshake messages are at most 64
/// bytes; the margin lets a plain-text refusal from a peer that does not speak
/// the handshake be read and shown in the error.
pub const MAX_HANDSHAKE_FRAME: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        StreamError::Frame(FrameError::Io(e))
    }
}

/// One frame in one write (a handshake message must not be split into two
/// segments needlessly), then flush.
fn send_message(stream: &mut impl Write, message: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + message.len());
    write_frame(&mut buf, message)?;
    stream.write_all(&buf)?;
    stream.flush()
}

/// Runs the handshake as the connecting side.
pub fn handshake_initiator<S: Read + Write>(
    stream: &mut S,
    key: &Key,
    label: &str,
) -> Result<Session, StreamError> {
    let (initiator, message1) = Initiator::start(key, label);
    send_message(stream, &message1)?;
    let message2 = read_frame(stream, MAX_HANDSHAKE_FRAME)?;
    match initiator.finish(&message2) {
        Ok((message3, session)) => {
            send_message(stream, &message3)?;
            Ok(session)
        }
        Err(e) => {
            if matches!(e, AuthError::WrongKey) {
                // A message 3 that cannot verify, so the responder logs "wrong key"
                // instead of a bare disconnect. Best effort: we are failing anyway.
                let _ = send_message(stream, &[0u8; super::MESSAGE3_LEN]);
            }
            Err(e.into())
        }
    }
}

/// Runs the handshake as the accepting side.
pub fn handshake_responder<S: Read + Write>(
    stream: &mut S,
    key: &Key,
    label: &str,
) -> Result<Session, StreamError> {
    let message1 = read_frame(stream, MAX_HANDSHAKE_FRAME)?;
    handshake_responder_after(stream, key, label, &message1)
}

/// The accepting side's handshake when the caller already read message 1 (to
/// look at it first, e.g. to recognise a client that sent no handshake at all).
pub fn handshake_responder_after<S: Read + Write>(
    stream: &mut S,
    key: &Key,
    label: &str,
    message1: &[u8],
) -> Result<Session, StreamError> {
    let (responder, message2) = Responder::respond(key, label, message1)?;
    send_message(stream, &message2)?;
    let message3 = read_frame(stream, MAX_HANDSHAKE_FRAME)?;
    Ok(responder.finish(&message3)?)
}

/// Writes one sealed frame (`u32` LE length, payload, tag); the caller flushes buffered writers.
pub fn write_sealed(w: &mut impl Write, sealer: &mut Sealer, payload: &[u8]) -> io::Result<()> {
    write_frame(w, &sealer.seal(payload))
}

/// Reads and opens one sealed frame whose payload is at most `limit` bytes.
/// Any error leaves the stream unusable: close it.
pub fn read_opened(
    r: &mut impl Read,
    opener: &mut Opener,
    limit: u32,
) -> Result<Vec<u8>, StreamError> {
    const TAG: u32 = TAG_LEN as u32;
    let sealed = read_frame(r, limit.saturating_add(TAG)).map_err(|e| match e {
        // Report in payload bytes, as the caller's limit is.
        FrameError::TooLarge { len, .. } => FrameError::TooLarge {
            len: len.saturating_sub(TAG),
            limit,
        },
        other => other,
    })?;
    Ok(opener.open(&sealed)?)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    const LABEL: &str = "twinvm-test/1";

    type End = Result<(TcpStream, Session), StreamError>;

    /// A handshake over real loopback TCP, responder in a thread: (initiator, responder).
    fn connect(ki: &Key, kr: &Key) -> (End, End) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let kr = kr.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            handshake_responder(&mut s, &kr, LABEL).map(|sess| (s, sess))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let client = handshake_initiator(&mut c, ki, LABEL).map(|sess| (c, sess));
        (client, server.join().unwrap())
    }

    #[test]
    fn sealed_frames_over_tcp() {
        let k = Key::generate();
        let (client, server) = connect(&k, &k);
        let (mut c, mut cs) = client.unwrap();
        let (mut s, mut ss) = server.unwrap();
        for i in 0..10u32 {
            write_sealed(&mut c, &mut cs.sealer, &i.to_le_bytes()).unwrap();
            let got = read_opened(&mut s, &mut ss.opener, 64).unwrap();
            assert_eq!(got, i.to_le_bytes());
            write_sealed(&mut s, &mut ss.sealer, b"ok").unwrap();
            assert_eq!(read_opened(&mut c, &mut cs.opener, 64).unwrap(), b"ok");
        }
        // A plain frame after authentication is refused.
        write_frame(
            &mut c,
            br#"{"Reset":{"client_id":7,"seq":2,"vm":"vm1","generation":2}}"#,
        )
        .unwrap();
        assert!(matches!(
            read_opened(&mut s, &mut ss.opener, 1024),
            Err(StreamError::Auth(AuthError::BadFrame { seq: 10 }))
        ));
    }

    #[test]
    fn wrong_key_over_tcp_is_reported_on_both_sides() {
        let (client, server) = connect(&Key::generate(), &Key::generate());
        assert!(matches!(
            client,
            Err(StreamError::Auth(AuthError::WrongKey))
        ));
        assert!(matches!(
            server,
            Err(StreamError::Auth(AuthError::WrongKey))
        ));
    }

    #[test]
    fn oversize_sealed_frame_is_refused_from_its_length() {
        let (mut i, mut r) = {
            let k = Key::generate();
            let (init, m1) = Initiator::start(&k, LABEL);
            let (resp, m2) = Responder::respond(&k, LABEL, &m1).unwrap();
            let (m3, si) = init.finish(&m2).unwrap();
            (si, resp.finish(&m3).unwrap())
        };
        let mut buf = Vec::new();
        write_sealed(&mut buf, &mut i.sealer, &[0u8; 100]).unwrap();
        assert!(matches!(
            read_opened(&mut Cursor::new(&buf), &mut r.opener, 99),
            Err(StreamError::Frame(FrameError::TooLarge {
                len: 100,
                limit: 99
            }))
        ));
        assert_eq!(
            read_opened(&mut Cursor::new(&buf), &mut r.opener, 100).unwrap(),
            vec![0u8; 100]
        );
        // A frame cut short is an I/O error, not a panic.
        let mut buf = Vec::new();
        write_sealed(&mut buf, &mut i.sealer, b"abc").unwrap();
        buf.truncate(buf.len() - 1);
        assert!(read_opened(&mut Cursor::new(&buf), &mut r.opener, 100).is_err());
    }

    #[test]
    fn peer_closing_mid_handshake_is_a_clean_error() {
        let k = Key::generate();
        // The responder gets message 1 and then EOF.
        let mut input = Vec::new();
        write_frame(&mut input, &[9u8; 32]).unwrap();
        let mut duplex = Duplex(Cursor::new(input), Vec::new());
        assert!(matches!(
            handshake_responder(&mut duplex, &k, LABEL),
            Err(StreamError::Frame(FrameError::Closed))
        ));
        // The initiator gets nothing at all.
        let mut duplex = Duplex(Cursor::new(Vec::new()), Vec::new());
        assert!(matches!(
            handshake_initiator(&mut duplex, &k, LABEL),
            Err(StreamError::Frame(FrameError::Closed))
        ));
        // Or a huge length prefix: refused before allocating.
        let mut duplex = Duplex(Cursor::new(u32::MAX.to_le_bytes().to_vec()), Vec::new());
        assert!(matches!(
            handshake_initiator(&mut duplex, &k, LABEL),
            Err(StreamError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    /// Reads from one buffer, writes to another.
    struct Duplex(Cursor<Vec<u8>>, Vec<u8>);

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
