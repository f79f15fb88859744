//! The clone channel on a blocking TCP stream: the logging channel's PSK
//! handshake (label [`super::HANDSHAKE_LABEL`]), then `u32 length | sealed
//! message` frames. A stranger without the key fails the handshake; a
//! frame that does not open or is too long ends the channel.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use arbiter::auth::{Initiator, Key, Opener, Responder, Sealer, TAG_LEN};

use super::{CloneError, HANDSHAKE_LABEL, MAX_FRAME_BYTES};

/// An authenticated clone channel.
pub struct CloneChannel {
    stream: TcpStream,
    sealer: Sealer,
    opener: Opener,
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> CloneError {
    move |e| CloneError::Io {
        what,
        error: e.to_string(),
    }
}

fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> Result<(), CloneError> {
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    stream
        .write_all(&frame)
        .map_err(io_err("writing to the clone channel"))
}

fn read_frame(stream: &mut TcpStream, limit: u32) -> Result<Vec<u8>, CloneError> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(io_err("reading from the clone channel"))?;
    let len = u32::from_le_bytes(len);
    if len > limit {
        return Err(CloneError::FrameTooLarge { len, limit });
    }
    let mut frame = vec![0u8; len as usize];
    stream
        .read_exact(&mut frame)
        .map_err(io_err("reading from the clone channel"))?;
    Ok(frame)
}

impl CloneChannel {
    /// The primary's side: run the handshake as initiator.
    pub fn connect(
        mut stream: TcpStream,
        key: &Key,
        timeout: Duration,
    ) -> Result<Self, CloneError> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("setting a read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("setting a write timeout"))?;
        let (initiator, message1) = Initiator::start(key, HANDSHAKE_LABEL);
        write_frame(&mut stream, &message1)?;
        let message2 = read_frame(&mut stream, 1024)?;
        let (message3, session) = initiator
            .finish(&message2)
            .map_err(|e| CloneError::Handshake(e.to_string()))?;
        write_frame(&mut stream, &message3)?;
        Ok(CloneChannel {
            stream,
            sealer: session.sealer,
            opener: session.opener,
        })
    }

    /// The new backup's side: answer the handshake as responder.
    pub fn accept(mut stream: TcpStream, key: &Key, timeout: Duration) -> Result<Self, CloneError> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("setting a read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("setting a write timeout"))?;
        let message1 = read_frame(&mut stream, 1024)?;
        let (responder, message2) = Responder::respond(key, HANDSHAKE_LABEL, &message1)
            .map_err(|e| CloneError::Handshake(e.to_string()))?;
        write_frame(&mut stream, &message2)?;
        let message3 = read_frame(&mut stream, 1024)?;
        let session = responder
            .finish(&message3)
            .map_err(|e| CloneError::Handshake(e.to_string()))?;
        Ok(CloneChannel {
            stream,
            sealer: session.sealer,
            opener: session.opener,
        })
    }

    /// Bound how long one receive may wait.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), CloneError> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("setting a read timeout"))
    }

    pub fn send(&mut self, message: &[u8]) -> Result<(), CloneError> {
        if message.len() + TAG_LEN > MAX_FRAME_BYTES as usize {
            return Err(CloneError::FrameTooLarge {
                len: (message.len() + TAG_LEN) as u32,
                limit: MAX_FRAME_BYTES,
            });
        }
        let sealed = self.sealer.seal(message);
        write_frame(&mut self.stream, &sealed)
    }

    pub fn recv(&mut self) -> Result<Vec<u8>, CloneError> {
        let sealed = read_frame(&mut self.stream, MAX_FRAME_BYTES)?;
        self.opener
            .open(&sealed)
            .map_err(|e| CloneError::Unauthenticated(e.to_string()))
    }

    /// Close both directions (the peer sees the end at once).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    const T: Duration = Duration::from_secs(5);

    fn pair(
        key_a: Key,
        key_b: Key,
    ) -> (
        Result<CloneChannel, CloneError>,
        Result<CloneChannel, CloneError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            CloneChannel::accept(s, &key_b, T)
        });
        let client = CloneChannel::connect(TcpStream::connect(addr).unwrap(), &key_a, T);
        (client, server.join().unwrap())
    }

    #[test]
    fn messages_flow_both_ways_with_the_same_key() {
        let key = Key::generate();
        let (a, b) = pair(key.clone(), key);
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        a.send(b"hello").unwrap();
        assert_eq!(b.recv().unwrap(), b"hello");
        b.send(b"ok").unwrap();
        assert_eq!(a.recv().unwrap(), b"ok");
    }

    #[test]
    fn a_stranger_without_the_key_fails_the_handshake() {
        let (a, b) = pair(Key::generate(), Key::generate());
        assert!(matches!(
            a,
            Err(CloneError::Handshake(_)) | Err(CloneError::Io { .. })
        ));
        assert!(b.is_err());
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            CloneChannel::accept(s, &Key::generate(), T)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(CloneError::FrameTooLarge { .. })
        ));
    }
}
