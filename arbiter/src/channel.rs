//! A connection's frames after the optional authentication: sealed when the
//! node or client has a key, plain in the unprotected mode (no `--key-file`).
//! Client, server and peer transport all read and write through these, so
//! the two modes differ only where the connection is set up.

use std::io::{self, Read, Write};

use crate::auth::{read_opened, write_sealed, Opener, Sealer, Session, StreamError};
use crate::frame::{read_frame, write_frame};

/// Protocol label of every arbiter connection (client and peer alike: the
/// responder must pick the label before it knows the role, which then travels
/// in the authenticated `Hello`).
pub const ARBITER_LABEL: &str = "twinvm-arbiter/1";

pub struct FrameReader<R> {
    inner: R,
    opener: Option<Opener>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, opener: Option<Opener>) -> Self {
        FrameReader { inner, opener }
    }

    /// The next frame's payload (at most `limit` bytes), opened if sealed.
    pub fn read(&mut self, limit: u32) -> Result<Vec<u8>, StreamError> {
        match &mut self.opener {
            Some(opener) => read_opened(&mut self.inner, opener, limit),
            None => Ok(read_frame(&mut self.inner, limit)?),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

pub struct FrameWriter<W> {
    inner: W,
    sealer: Option<Sealer>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, sealer: Option<Sealer>) -> Self {
        FrameWriter { inner, sealer }
    }

    /// Writes one frame, sealed if this connection is authenticated; does not flush.
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        match &mut self.sealer {
            Some(sealer) => write_sealed(&mut self.inner, sealer, payload),
            None => write_frame(&mut self.inner, payload),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reader and writer halves for an optional session.
pub fn split<R: Read, W: Write>(
    reader: R,
    writer: W,
    session: Option<Session>,
) -> (FrameReader<R>, FrameWriter<W>) {
    let (sealer, opener) = match session {
        Some(Session { sealer, opener }) => (Some(sealer), Some(opener)),
        None => (None, None),
    };
    (
        FrameReader::new(reader, opener),
        FrameWriter::new(writer, sealer),
    )
}
