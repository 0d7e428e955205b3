//! Parameter values as the config writes them: sizes (`"1GiB"` or bytes), durations (`"5s"`,
//! `"500ms"`), and the checks every kind's fields share. Each parses with checked arithmetic
//! and prints back in a canonical form that parses to the same value.
//!
//! Called on control threads only (config reading, the control socket, the state file); none of
//! it blocks.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use stackbd_core::SECTOR_SIZE;
use std::fmt;
use toml::Value;

const SIZE_HELP: &str =
    "expected bytes, or a whole number with a unit: B, K/KiB, M/MiB, G/GiB, T/TiB (1K = 1024)";

/// Binary units, largest first, as sizes print.
const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];

/// A leaf size in bytes: more than 0, a whole number of 512-byte sectors.
///
/// Reads an integer (bytes) or a string (`"4096"`, `"512B"`, `"64K"`, `"64KiB"`, `"1 GiB"`);
/// prints `"1GiB"` when a binary unit divides it, else the number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

impl Size {
    /// A size of `bytes`, checked (non-zero, whole sectors).
    pub fn new(bytes: u64) -> Result<Size, String> {
        checked_size(&bytes.to_string(), bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// From a config value: an integer or a string with a unit.
    pub fn from_value(v: &Value) -> Result<Size, String> {
        match v {
            Value::Integer(n) if *n < 0 => Err(format!("invalid size {n}: negative")),
            Value::Integer(n) => checked_size(&n.to_string(), *n as u64),
            Value::String(s) => parse_size(s).map(Size),
            Value::Float(x) => Err(format!("invalid size {x}: {SIZE_HELP}")),
            v => Err(format!(
                "expected a size (bytes, or a string like \"1GiB\"), got {}",
                v.type_str()
            )),
        }
    }

    /// The canonical config value: `"1GiB"`, or bytes (an integer when TOML can hold it).
    pub fn to_value(self) -> Value {
        for (unit, shift) in UNITS {
            if self.0 >> shift > 0 && self.0.trailing_zeros() >= shift {
                return Value::String(format!("{}{unit}", self.0 >> shift));
            }
        }
        match i64::try_from(self.0) {
            Ok(n) => Value::Integer(n),
            Err(_) => Value::String(self.0.to_string()),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_value() {
            Value::String(s) => f.write_str(&s),
            v => write!(f, "{v}"),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Size::from_value(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Parses a size: `4096`, `"512B"`, `"64K"`, `"64KiB"`, `"1 GiB"`, ... Units are binary
/// (`K` = `KiB` = 1024); decimal units (`KB`, `GB`...) and fractions are refused, and so is a
/// size that overflows 64 bits, is 0 or is not a whole number of sectors.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let unit = unit.trim_start();
    let shift = match unit {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        "KB" | "MB" | "GB" | "TB" | "kB" => {
            return Err(format!(
                "invalid size '{text}': '{unit}' is ambiguous; write {}iB (binary) or the \
                 number of bytes",
                &unit[..1].to_ascii_uppercase()
            ))
        }
        _ => return Err(format!("invalid size '{text}': {SIZE_HELP}")),
    };
    if num.is_empty() {
        return Err(format!("invalid size '{text}': {SIZE_HELP}"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{text}': too large"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{text}': too large"))?;
    checked_size(&format!("'{text}'"), bytes).map(Size::bytes)
}

/// Checks a size in bytes; `shown` is how it was written.
fn checked_size(shown: &str, bytes: u64) -> Result<Size, String> {
    if bytes == 0 {
        return Err(format!("invalid size {shown}: a leaf cannot be empty"));
    }
    if !bytes.is_multiple_of(SECTOR_SIZE as u64) {
        return Err(format!(
            "invalid size {shown}: {bytes} bytes is not a whole number of {SECTOR_SIZE}-byte \
             sectors"
        ));
    }
    Ok(Size(bytes))
}

/// A positive duration of at most [`TimeSpan::MAX`], to the nanosecond.
///
/// Reads a string, a decimal number with a unit (`"5s"`, `"500ms"`, `"1.5s"`, `"2m"`,
/// `"100us"`, `"250ns"`; no unit means seconds) or an integer (seconds); prints the largest of
/// `s`, `ms`, `us`, `ns` that divides it (`"5s"`, `"1500ms"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeSpan(std::time::Duration);

impl TimeSpan {
    /// The longest accepted: one day (so deadlines computed from it never overflow).
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(86_400);

    pub fn new(d: std::time::Duration) -> Result<TimeSpan, String> {
        if d.is_zero() {
            return Err("invalid duration 0: must be more than 0".into());
        }
        if d > Self::MAX {
            return Err(format!(
                "invalid duration {d:?}: at most {}s (one day)",
                Self::MAX.as_secs()
            ));
        }
        Ok(TimeSpan(d))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }

    /// Parses `"5s"`, `"500ms"`, `"1.5s"`, ... exactly (no floating point).
    pub fn parse(text: &str) -> Result<TimeSpan, String> {
        let bad = |why: &str| format!("invalid duration '{text}': {why}");
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit_ns: u128 = match unit.trim() {
            "ns" => 1,
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" | "" => 1_000_000_000,
            "m" | "min" => 60_000_000_000,
            _ => return Err(bad("use ns, us, ms, s or m")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(bad("expected a positive number"));
        }
        // int.frac * unit, in nanoseconds, exactly; anything past a day is refused anyway, so
        // more than 30 digits is "too long" before it can overflow.
        if int.len() + frac.len() > 30 {
            return Err(bad("too long"));
        }
        let digits: u128 = format!("{int}{frac}")
            .parse()
            .map_err(|_| bad("expected a positive number"))?;
        let scale = 10u128.pow(frac.len() as u32);
        let ns = digits.checked_mul(unit_ns).ok_or_else(|| bad("too long"))?;
        if !ns.is_multiple_of(scale) {
            return Err(bad("finer than a nanosecond"));
        }
        let ns = ns / scale;
        if ns == 0 {
            return Err(bad("must be more than 0"));
        }
        if ns > Self::MAX.as_nanos() {
            return Err(bad(&format!("at most {}s (one day)", Self::MAX.as_secs())));
        }
        Ok(TimeSpan(std::time::Duration::from_nanos(ns as u64)))
    }

    pub fn from_value(v: &Value) -> Result<TimeSpan, String> {
        match v {
            Value::String(s) => TimeSpan::parse(s),
            Value::Integer(n) if *n > 0 => TimeSpan::new(std::time::Duration::from_secs(*n as u64)),
            _ => Err("expected a duration like \"5s\" or \"500ms\"".to_string()),
        }
    }

    pub fn to_value(self) -> Value {
        Value::String(self.to_string())
    }
}

impl fmt::Display for TimeSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        for (unit, per) in [("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)] {
            if ns.is_multiple_of(per) {
                return write!(f, "{}{unit}", ns / per);
            }
        }
        write!(f, "{ns}ns")
    }
}

impl Serialize for TimeSpan {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for TimeSpan {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TimeSpan::from_value(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

// Field checks: each takes a config value and says what is wrong with it, in the words the
// config's errors use (the key is put in front by the caller).

pub fn check_bool(v: &Value) -> Result<(), String> {
    match v {
        Value::Boolean(_) => Ok(()),
        v => Err(format!("expected true or false, got {}", v.type_str())),
    }
}

/// A whole number in `min..=max`.
pub fn check_int(v: &Value, min: i64, max: i64) -> Result<(), String> {
    match v {
        Value::Integer(n) if (min..=max).contains(n) => Ok(()),
        Value::Integer(n) => Err(format!("{n} is out of range ({min}..={max})")),
        v => Err(format!("expected a whole number, got {}", v.type_str())),
    }
}

/// A non-empty string.
pub fn check_string(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) if s.is_empty() => Err("empty".into()),
        Value::String(_) => Ok(()),
        v => Err(format!("expected a string, got {}", v.type_str())),
    }
}

pub fn check_size(v: &Value) -> Result<(), String> {
    Size::from_value(v).map(drop)
}

pub fn check_time(v: &Value) -> Result<(), String> {
    TimeSpan::from_value(v).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        for bad in ["", "GiB", "1.5GiB", "1XB", "-1G", "1 gib", "1Gi", "0", "0G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("1GB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1000").unwrap_err().contains("512-byte sectors"));
        // Overflow is an error, never a panic or a wrapped value.
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(Size::from_value(&Value::Integer(-512)).is_err());
        assert!(Size::from_value(&Value::Float(1.0)).is_err());
        assert!(Size::from_value(&Value::Boolean(true))
            .unwrap_err()
            .contains("got boolean"));
    }

    #[test]
    fn sizes_print_back_to_themselves() {
        for bytes in [
            512,
            1024,
            1536,
            3 << 20,
            1 << 30,
            5 << 40,
            u64::MAX / 512 * 512,
            (i64::MAX as u64) / 512 * 512,
            (1 << 63) + 512,
        ] {
            let s = Size::new(bytes).unwrap();
            let v = s.to_value();
            assert_eq!(Size::from_value(&v), Ok(s), "{bytes} printed as {v}");
        }
        assert_eq!(
            Size::new(1 << 30).unwrap().to_value(),
            Value::String("1GiB".into())
        );
        assert_eq!(Size::new(1536).unwrap().to_value(), Value::Integer(1536));
        assert_eq!(Size::new(3 << 9 << 10).unwrap().to_string(), "1536KiB");
    }

    #[test]
    fn durations() {
        let p = |s: &str| TimeSpan::parse(s).map(TimeSpan::get);
        assert_eq!(p("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(p("5"), Ok(Duration::from_secs(5)));
        assert_eq!(p("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(p("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(p("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(p("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(p("0.000000001s"), Ok(Duration::from_nanos(1)));
        assert_eq!(
            p("1 day"),
            Err("invalid duration '1 day': use ns, us, ms, s or m".into())
        );
        for bad in [
            "",
            "s",
            "0s",
            "0.0s",
            "-1s",
            "1..5s",
            ".",
            "5 parsecs",
            "0.1ns",
            "1.2.3s",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
        // Huge values are errors, never a panic.
        assert!(p("86401s").unwrap_err().contains("at most 86400s"));
        assert!(p("99999999999999999999999999999m").is_err());
        assert!(p("9999999999999999999999999999999999999999s").is_err());
        assert!(TimeSpan::from_value(&Value::Integer(i64::MAX)).is_err());
        assert!(TimeSpan::from_value(&Value::Integer(0)).is_err());
        assert!(TimeSpan::new(Duration::MAX).is_err());
    }

    #[test]
    fn durations_print_back_to_themselves() {
        for d in [
            Duration::from_secs(5),
            Duration::from_millis(1500),
            Duration::from_micros(1),
            Duration::from_nanos(1_000_000_001),
            TimeSpan::MAX,
        ] {
            let t = TimeSpan::new(d).unwrap();
            assert_eq!(TimeSpan::parse(&t.to_string()), Ok(t), "{t}");
        }
        assert_eq!(
            TimeSpan::new(Duration::from_millis(1500))
                .unwrap()
                .to_string(),
            "1500ms"
        );
        assert_eq!(
            TimeSpan::new(Duration::from_secs(30)).unwrap().to_string(),
            "30s"
        );
    }

    #[test]
    fn field_checks() {
        assert_eq!(
            check_bool(&Value::String("yes".into())),
            Err("expected true or false, got string".into())
        );
        assert_eq!(
            check_int(&Value::Integer(0), 1, 4096),
            Err("0 is out of range (1..=4096)".into())
        );
        assert_eq!(
            check_int(&Value::String("deep".into()), 1, 4096),
            Err("expected a whole number, got string".into())
        );
        assert_eq!(
            check_string(&Value::String(String::new())),
            Err("empty".into())
        );
    }
}
