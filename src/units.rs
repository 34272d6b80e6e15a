//! Human-written quantities: sizes (`1MiB`) and durations (`30s`), for flags and config files alike.

use std::time::Duration;

/// Parses `4096`, `256K`, `1M`, `1MiB`, `2G`, `2GiB` (all binary multiples).
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("{raw:?} is not a size like 1MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{raw:?}: unknown size unit")),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{raw:?} is too large"))
}

/// Parses `250ms`, `30s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        "d" => Duration::from_secs(value.saturating_mul(86_400)),
        _ => return Err(format!("{raw:?}: unknown duration unit (ms, s, m, h, d)")),
    })
}

/// Parses a chunk size (`--chunk-size`, `chunk_size`): a size within [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
///
/// [`MIN_CHUNK_SIZE`]: crate::MIN_CHUNK_SIZE
/// [`MAX_CHUNK_SIZE`]: crate::MAX_CHUNK_SIZE
pub fn parse_chunk_size(raw: &str) -> Result<u32, String> {
    let size = parse_size(raw)?;
    let size = u32::try_from(size).map_err(|_| format!("{raw:?} is too large"))?;
    if !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!("chunk size must be between 4KiB and 16MiB, got {raw}"));
    }
    Ok(size)
}

/// Writes a size the way [`parse_size`] reads it: the largest binary unit that divides it (`24MiB`, `1000`).
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Writes a duration the way [`parse_duration`] reads it: the largest unit that divides it (`7d`, `90s`, `250ms`).
/// Sub-millisecond parts are dropped.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let secs = duration.as_secs();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs != 0 && secs.is_multiple_of(len) {
            return format!("{}{unit}", secs / len);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999T").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn chunk_sizes_are_bounded() {
        assert!(parse_chunk_size("1K").is_err());
        assert!(parse_chunk_size("32MiB").is_err());
        assert_eq!(parse_chunk_size("1MiB"), Ok(1 << 20));
    }

    #[test]
    fn formatted_quantities_parse_back() {
        for bytes in [0, 1, 1000, 4096, 24 << 20, 3 << 30, (1 << 40) + 1] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{}", format_size(bytes));
        }
        assert_eq!(format_size(24 << 20), "24MiB");
        for secs in [0, 1, 59, 60, 90, 3600, 86_400, 7 * 86_400] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
    }
}
