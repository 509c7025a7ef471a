//! The one duration format of config files, flags and env vars: a whole number with a unit,
//! `"250ms"`, `"30s"`, `"5m"`, `"1h"`. A bare number is refused (seconds in one section and
//! milliseconds in another was a trap), and so is anything else, naming the field.

use std::time::Duration;

/// Parses `250ms`, `30s`, `5m` or `1h` (surrounding spaces allowed); `None` otherwise.
pub fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let secs = |factor: u64| number.checked_mul(factor).map(Duration::from_secs);
    match unit.trim() {
        "ms" => Some(Duration::from_millis(number)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => None,
    }
}

/// The shortest text [`parse`] reads back as `d` (sub-millisecond parts are dropped).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

/// What an error says a duration should look like.
pub const EXPECTED: &str = "a duration with a unit, like \"250ms\", \"30s\", \"5m\" or \"1h\"";

/// `#[serde(with = "crate::duration::text")]`: a duration field written as [`format`] and read
/// with [`parse`]; a bare number or an unknown unit fails naming what was given.
pub mod text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as [`super::format`] does.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// Reads a string in the one format; numbers and other types are refused.
    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(i64),
        }
        let given = match Raw::deserialize(de)? {
            Raw::Text(text) => match super::parse(&text) {
                Some(d) => return Ok(d),
                None => format!("{:?}", text.chars().take(32).collect::<String>()),
            },
            Raw::Number(n) => format!("the bare number {n}"),
        };
        Err(serde::de::Error::custom(format!(
            "expected {}, got {given}",
            super::EXPECTED
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_and_format_round_trips() {
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse(" 30s "), Some(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
        for bad in ["30", "", "ms", "1.5s", "-1s", "2d", "1 h x"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        for d in [0, 1, 999, 1_000, 61_000, 120_000, 3_600_000, 5_400_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse(&format(d)), Some(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(5400)), "90m");
    }

    #[test]
    fn serde_refuses_bare_numbers_naming_the_format() {
        #[derive(serde::Deserialize, serde::Serialize, Debug)]
        struct S {
            #[serde(with = "text")]
            t: Duration,
        }
        let s: S = toml::from_str("t = \"50ms\"").unwrap();
        assert_eq!(s.t, Duration::from_millis(50));
        assert_eq!(toml::to_string(&s).unwrap().trim(), "t = \"50ms\"");
        let err = toml::from_str::<S>("t = 50").unwrap_err().to_string();
        assert!(
            err.contains("the bare number 50") && err.contains("\"30s\""),
            "{err}"
        );
        let err = toml::from_str::<S>("t = \"soon\"").unwrap_err().to_string();
        assert!(err.contains("\"soon\""), "{err}");
    }
}
