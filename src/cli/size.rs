//! Memory sizes on the command line: `512M`, `1G`, `1GiB`, `65536K`, or a bare
//! number of MiB (as QEMU's `-m`).

/// Parse a size into bytes, or say what is wrong with it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("`{text}` is not a size (examples: 512M, 2G, 256)"));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "b" => 0,
        other => return Err(format!("`{text}`: unknown unit `{other}` (use K, M or G)")),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("65536k").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096b").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn garbage_is_named() {
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("M").unwrap_err().contains("not a size"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit `x`"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("99999999999G")
            .unwrap_err()
            .contains("too large"));
    }
}
