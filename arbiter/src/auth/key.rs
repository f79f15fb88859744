//! The pre-shared key: hex text, key files, generation.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::path::Path;

use rand::RngCore as _;

use super::{AuthError, KEY_LEN};

/// Largest key file read (a key file holds 64 hex digits and maybe a newline).
const MAX_KEY_FILE: u64 = 4096;

/// A 256-bit pre-shared key. `Debug` never prints it.
#[derive(Clone)]
pub struct Key(pub(super) [u8; KEY_LEN]); // visible to the handshake code, never outside `auth`

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// Exactly 64 hex digits (either case); surrounding whitespace is allowed.
    pub fn from_hex(s: &str) -> Result<Key, AuthError> {
        let s = s.trim();
        if s.len() != 2 * KEY_LEN {
            // The length in characters, never the content: a near-miss could be the key.
            return Err(AuthError::KeyFormat(format!(
                "expected {} hex digits, found {} characters",
                2 * KEY_LEN,
                s.chars().count()
            )));
        }
        let digit = |pos: usize| {
            (s.as_bytes()[pos] as char).to_digit(16).ok_or_else(|| {
                AuthError::KeyFormat(format!("character {} is not a hex digit", pos + 1))
            })
        };
        let mut bytes = [0u8; KEY_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (digit(2 * i)? * 16 + digit(2 * i + 1)?) as u8;
        }
        Ok(Key(bytes))
    }

    /// Reads a key file: the hex key (see [`Key::from_hex`]). The file must not be
    /// accessible by group or others (like ssh private keys), since anyone who can
    /// read it can win or reset any VM's slot.
    pub fn from_file(path: &Path) -> Result<Key, AuthError> {
        let io_err = |error| AuthError::KeyFileIo {
            path: path.to_owned(),
            error,
        };
        let invalid = |reason: String| AuthError::KeyFileInvalid {
            path: path.to_owned(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(invalid(format!(
                    "accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
                    path.display()
                )));
            }
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io_err)?;
        if text.len() as u64 > MAX_KEY_FILE {
            return Err(invalid(format!(
                "longer than {MAX_KEY_FILE} bytes; a key file holds 64 hex digits"
            )));
        }
        Key::from_hex(&text).map_err(|e| match e {
            AuthError::KeyFormat(reason) => invalid(reason),
            other => other,
        })
    }

    /// A fresh key from the OS random number generator.
    pub fn generate() -> Key {
        let mut bytes = [0u8; KEY_LEN];
        // Panics only if the OS has no random source (getrandom(2) failing), which
        // no key could be made without.
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Key(bytes)
    }

    /// Lower-case hex, 64 digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes the key to a new file (hex and a newline), mode 0600 from the
    /// start; an existing file is never overwritten (that could lock a cluster out).
    pub fn save_new(&self, path: &Path) -> Result<(), AuthError> {
        let io_err = |error: io::Error| AuthError::KeyFileIo {
            path: path.to_owned(),
            error: if error.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    error.kind(),
                    "already exists; refusing to overwrite a key (remove it first if you mean to replace it)",
                )
            } else {
                error
            },
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(io_err)?;
        file.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hex_round_trip_and_errors() {
        let k = Key::generate();
        let hex = k.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(
            Key::from_hex(&format!("  {}\n", hex.to_uppercase()))
                .unwrap()
                .0,
            k.0
        );
        for bad in [
            "",
            "abc",
            &hex[..63],
            &format!("{hex}0"),
            &format!("{}g", &hex[..63]),
        ] {
            let err = Key::from_hex(bad).unwrap_err();
            assert!(matches!(err, AuthError::KeyFormat(_)), "{bad}: {err}");
            assert!(!err.to_string().contains(&hex[..16]), "{err}");
        }
        // Multi-byte characters of the right byte length are refused, not sliced.
        assert!(Key::from_hex(&"é".repeat(32)).is_err());
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
        assert_ne!(Key::generate().0, k.0);
    }

    #[test]
    fn key_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.key");
        let k = Key::generate();
        k.save_new(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(Key::from_file(&path).unwrap().0, k.0);
        // Never overwritten.
        let err = Key::generate().save_new(&path).unwrap_err();
        assert!(err.to_string().contains("arbiter.key"), "{err}");
        assert_eq!(Key::from_file(&path).unwrap().0, k.0);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Key::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );

        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not a key\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Key::from_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.key") && err.contains("64 hex digits"),
            "{err}"
        );

        let big = dir.path().join("big.key");
        std::fs::write(&big, vec![b'a'; 10_000]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::from_file(&big)
            .unwrap_err()
            .to_string()
            .contains("longer than"));

        let missing = dir.path().join("missing.key");
        let err = Key::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.key"), "{err}");
        assert!(Key::from_file(dir.path()).is_err());
    }
}
