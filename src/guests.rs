//! The test guests from guest-images/, built by build.rs and embedded in the
//! binary so `--kernel builtin:NAME` and the demo need no files.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// An embedded test guest.
pub struct Guest {
    /// What `builtin:NAME` names: the file name without `.S`.
    pub name: &'static str,
    /// One line: the guest source's first comment line after `NAME: `.
    pub description: &'static str,
    /// The ELF image.
    pub image: &'static [u8],
}

/// Prefix that names an embedded guest instead of a file.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// The ELF image of an embedded guest.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    find(name).map(|g| g.image)
}

/// The one-line description of an embedded guest, empty for a name that
/// is not one.
pub fn describe(name: &str) -> &'static str {
    find(name).map_or("", |g| g.description)
}

/// Names of the embedded guests, for help and error messages.
pub fn names() -> Vec<&'static str> {
    GUESTS.iter().map(|g| g.name).collect()
}

fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_x86_64_elf() {
        assert!(names().len() >= 4, "{:?}", names());
        for g in GUESTS {
            assert!(g.image.starts_with(b"\x7fELF"), "{}", g.name);
            assert_eq!(g.image[18], 62, "{} is not x86-64", g.name);
        }
        assert!(builtin("hello").is_some());
        assert!(builtin("nope").is_none());
    }

    #[test]
    fn every_guest_has_a_short_one_line_description() {
        for g in GUESTS {
            let d = describe(g.name);
            assert!(!d.is_empty(), "{}", g.name);
            assert!(!d.contains('\n'), "{}: {d:?}", g.name);
            assert!(d.len() <= 80, "{} is too long for a listing: {d:?}", g.name);
        }
        assert_eq!(
            describe("counter"),
            "virtio-net guest answering ARP, ICMP echo and a UDP counter"
        );
        assert_eq!(describe("nope"), "");
    }
}
