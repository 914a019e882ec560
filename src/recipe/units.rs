//! Sizes and durations as people write them in recipes.

use std::time::Duration;

/// Parse `"2GiB"`, `"512MiB"`, `"1G"` (binary units) or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{text}` is not a size");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return Err(bad()),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))?;
    if bytes == 0 {
        return Err(format!("`{text}` is zero"));
    }
    Ok(bytes)
}

/// Format bytes for people: the largest binary unit that divides evenly.
pub fn show_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// Parse `"180s"`, `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{text}` is not a duration");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let good = [
            ("2GiB", 2 << 30),
            ("512MiB", 512 << 20),
            ("1G", 1 << 30),
            ("4096", 4096),
            ("1TiB", 1 << 40),
        ];
        for (text, want) in good {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for text in [
            "",
            "0",
            "0GiB",
            "2 GB",
            "GiB",
            "-1G",
            "1.5G",
            "99999999999999999999T",
        ] {
            assert!(parse_size(text).is_err(), "{text} should be refused");
        }
        assert_eq!(show_size(2 << 30), "2GiB");
        assert_eq!(show_size(1536 << 20), "1536MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("180s"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        for text in ["", "10", "1d", "s", "1.5s"] {
            assert!(parse_duration(text).is_err(), "{text} should be refused");
        }
    }
}
