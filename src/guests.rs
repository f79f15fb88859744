//! The test guests from guest-images/, built by build.rs and embedded in the
//! binary so `--kernel builtin:NAME` and the demo need no files.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Prefix that names an embedded guest instead of a file.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// The ELF image of an embedded guest.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    GUESTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, image)| *image)
}

/// Names of the embedded guests, for help and error messages.
pub fn names() -> Vec<&'static str> {
    GUESTS.iter().map(|(n, _)| *n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_x86_64_elf() {
        assert!(names().len() >= 4, "{:?}", names());
        for (name, image) in GUESTS {
            assert!(image.starts_with(b"\x7fELF"), "{name}");
            assert_eq!(image[18], 62, "{name} is not x86-64");
        }
        assert!(builtin("hello").is_some());
        assert!(builtin("nope").is_none());
    }
}
