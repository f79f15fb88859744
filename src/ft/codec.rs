//! The byte codec shared by the pair's logging channel (`ft::wire`) and the
//! clone protocol (`clone::protocol`): little-endian integers and byte
//! strings with a `u32` length prefix. Decoding checks every length against
//! the bytes left and the caller's limit before anything is allocated; each
//! protocol's error wraps `CodecError` (its `Codec` variant).

/// What was wrong with a message's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("{message}.{field} is truncated: needs {needed} bytes, {remaining} left")]
    Truncated {
        message: &'static str,
        field: &'static str,
        needed: usize,
        remaining: usize,
    },
    #[error("{message}.{field} is {len}, more than the limit of {max}")]
    TooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{message}.{field} is not UTF-8")]
    NotUtf8 {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message} has {extra} unexpected trailing bytes")]
    Trailing { message: &'static str, extra: usize },
}

/// A message being encoded.
#[derive(Debug, Default)]
pub struct Enc(Vec<u8>);

impl Enc {
    /// A message starting with its kind byte.
    pub fn new(kind: u8) -> Self {
        Enc(vec![kind])
    }
    pub fn reserve(&mut self, additional: usize) {
        self.0.reserve(additional);
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Bytes of a length both sides know (no prefix).
    pub fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// A `u32` length, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        // Callers bound every field far below 4 GiB (frame and text limits).
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A message being decoded; `message` names it in errors.
#[derive(Debug)]
pub struct Dec<'a> {
    rest: &'a [u8],
    message: &'static str,
}

impl<'a> Dec<'a> {
    pub fn new(rest: &'a [u8], message: &'static str) -> Self {
        Dec { rest, message }
    }
    /// The message's name, for the caller's own errors.
    pub fn message(&self) -> &'static str {
        self.message
    }
    /// Bytes not yet decoded.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }
    /// The next `n` bytes, borrowed.
    pub fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], CodecError> {
        if self.rest.len() < n {
            return Err(CodecError::Truncated {
                message: self.message,
                field,
                needed: n,
                remaining: self.rest.len(),
            });
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CodecError> {
        let mut v = [0u8; N];
        v.copy_from_slice(self.take(field, N)?);
        Ok(v)
    }
    pub fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        self.array(field).map(u16::from_le_bytes)
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        self.array(field).map(u32::from_le_bytes)
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        self.array(field).map(u64::from_le_bytes)
    }
    /// A `u32` count or length, refused above `max`.
    pub fn len(&mut self, field: &'static str, max: usize) -> Result<usize, CodecError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(CodecError::TooLong {
                message: self.message,
                field,
                len,
                max,
            });
        }
        Ok(len)
    }
    /// A length-prefixed byte string, borrowed: nothing is allocated before
    /// the length has been checked against `max` and the bytes left.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], CodecError> {
        let len = self.len(field, max)?;
        self.take(field, len)
    }
    pub fn string(&mut self, field: &'static str, max: usize) -> Result<String, CodecError> {
        let bytes = self.bytes(field, max)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CodecError::NotUtf8 {
                message: self.message,
                field,
            })
    }
    /// Every byte must have been decoded.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing {
                message: self.message,
                extra: self.rest.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_every_byte_is_accounted_for() {
        let mut e = Enc::new(9);
        e.u16(0x1234);
        e.u32(0xdead_beef);
        e.u64(u64::MAX - 1);
        e.bytes(b"hello");
        e.raw(&[1, 2, 3]);
        let bytes = e.into_bytes();
        let mut d = Dec::new(&bytes[1..], "Test");
        assert_eq!(bytes[0], 9);
        assert_eq!(d.u16("a"), Ok(0x1234));
        assert_eq!(d.u32("b"), Ok(0xdead_beef));
        assert_eq!(d.u64("c"), Ok(u64::MAX - 1));
        assert_eq!(d.string("d", 5), Ok("hello".to_owned()));
        assert_eq!(d.remaining(), 3);
        assert_eq!(
            d.finish(),
            Err(CodecError::Trailing {
                message: "Test",
                extra: 3
            })
        );
        assert_eq!(d.array::<3>("e"), Ok([1, 2, 3]));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn lengths_are_checked_before_anything_is_taken() {
        let mut e = Enc::default();
        e.bytes(&[0xff; 10]);
        let bytes = e.into_bytes();
        let err = Dec::new(&bytes, "M").bytes("f", 9).unwrap_err();
        assert_eq!(
            err,
            CodecError::TooLong {
                message: "M",
                field: "f",
                len: 10,
                max: 9
            }
        );
        let err = Dec::new(&bytes[..8], "M").bytes("f", 10).unwrap_err();
        assert_eq!(
            err,
            CodecError::Truncated {
                message: "M",
                field: "f",
                needed: 10,
                remaining: 4
            }
        );
        let err = Dec::new(&bytes, "M").string("f", 10).unwrap_err();
        assert_eq!(
            err,
            CodecError::NotUtf8 {
                message: "M",
                field: "f"
            }
        );
    }
}
