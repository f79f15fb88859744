//! Length-prefixed frames on a byte stream (peer and client connections).
//!
//! Layout: `u32` little-endian payload length, then the payload. A frame
//! longer than the caller's limit is refused before any allocation, so a
//! hostile length cannot make us reserve gigabytes.

use std::io::{self, Read, Write};

/// Largest frame a client may send (requests are tiny).
pub const MAX_CLIENT_FRAME: u32 = 64 * 1024;
/// Largest frame between peers (snapshots travel in one frame).
pub const MAX_PEER_FRAME: u32 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// the peer closed the connection
    #[error("connection closed")]
    Closed,
    /// frame too large
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u32, limit: u32 },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Writes one frame; the caller flushes buffered writers.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame longer than 4 GiB"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(payload)
}

/// Reads one frame of at most `limit` bytes.
pub fn read_frame(r: &mut impl Read, limit: u32) -> Result<Vec<u8>, FrameError> {
    let mut len_bytes = [0u8; 4];
    match r.read_exact(&mut len_bytes) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len_bytes);
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        let mut cursor = io::Cursor::new(buf.clone());
        assert_eq!(read_frame(&mut cursor, 16).unwrap(), b"hello");
        assert_eq!(read_frame(&mut cursor, 16).unwrap(), b"");
        assert!(matches!(
            read_frame(&mut cursor, 16),
            Err(FrameError::Closed)
        ));

        let mut cursor = io::Cursor::new(buf);
        assert!(matches!(
            read_frame(&mut cursor, 3),
            Err(FrameError::TooLarge { len: 5, limit: 3 })
        ));
    }

    #[test]
    fn truncated_payload_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        buf.truncate(6);
        let mut cursor = io::Cursor::new(buf);
        assert!(matches!(
            read_frame(&mut cursor, 16),
            Err(FrameError::Io(_))
        ));
    }
}
