//! Kubernetes resource quantities (`512Mi`, `2Gi`, `1e9`, `1.5G`) as bytes.
//!
//! Follows `k8s.io/apimachinery/pkg/api/resource`: binary suffixes
//! (Ki..Ei), decimal suffixes (k, M, G, T, P, E, and m for milli), and
//! decimal exponents (`e3`, `E6`). Fractions of a byte round up.

/// Why a string is not a byte quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not in the Kubernetes quantity syntax.
    #[error("{0:?} is not a Kubernetes quantity; write e.g. 512Mi, 2Gi or 1073741824")]
    Syntax(String),
    /// Negative sizes make no sense for memory or disks.
    #[error("{0:?} is negative; a size must be zero or more")]
    Negative(String),
    /// Larger than 2^64 - 1 bytes.
    #[error("{0:?} is too large (more than 16 EiB)")]
    Overflow(String),
}

/// Schema of a quantity field: a string (`512Mi`) of at most 64 characters.
/// The API server's CEL cost estimate needs a bounded string type: with
/// `int-or-string`, or without `maxLength`, the quantity rules exceed the
/// budget, so integers are refused with "must be of type string".
pub fn string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": 64
    })
}

/// Deserializes a `Quantity` only from a string, as the CRD schema demands
/// (`k8s-openapi` alone would also take a number).
pub fn string_only<'de, D>(
    de: D,
) -> Result<k8s_openapi::apimachinery::pkg::api::resource::Quantity, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct StrOnly;
    impl serde::de::Visitor<'_> for StrOnly {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a quantity string such as 512Mi (quote plain numbers: \"1073741824\")")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    // deserialize_any: YAML formats would otherwise turn an unquoted number into a string.
    de.deserialize_any(StrOnly)
        .map(k8s_openapi::apimachinery::pkg::api::resource::Quantity)
}

/// Parses a quantity into a whole number of bytes (rounding up).
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax(text.to_string());
    let s = text.trim();
    if s.starts_with('-') {
        return Err(QuantityError::Negative(text.to_string()));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(num_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(syntax());
    }
    // (multiplier numerator, power of ten) for the suffix.
    let (mul, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => {
            let rest = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))
                .ok_or_else(syntax)?;
            let e: i32 = rest.parse().map_err(|_| syntax())?;
            if !(-18..=18).contains(&e) {
                return Err(QuantityError::Overflow(text.to_string()));
            }
            (1, e)
        }
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int_part}{frac_part}");
    if digits.len() > 30 {
        return Err(QuantityError::Overflow(text.to_string()));
    }
    let mantissa: u128 = digits.parse().map_err(|_| syntax())?;
    let exp = exp10 - i32::try_from(frac_part.len()).map_err(|_| syntax())?;
    let overflow = || QuantityError::Overflow(text.to_string());
    let scaled = mantissa.checked_mul(mul).ok_or_else(overflow)?;
    let value = if exp >= 0 {
        scaled
            .checked_mul(
                10u128
                    .checked_pow(exp.unsigned_abs())
                    .ok_or_else(overflow)?,
            )
            .ok_or_else(overflow)?
    } else {
        let div = 10u128
            .checked_pow(exp.unsigned_abs())
            .ok_or_else(overflow)?;
        scaled.div_ceil(div)
    };
    u64::try_from(value).map_err(|_| overflow())
}

/// Formats bytes as the shortest exact binary quantity (`512Mi`, `3Gi`, `1000`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    for (unit, shift) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_plain() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1500m"), Ok(2));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn rejects_garbage_negative_and_huge() {
        assert!(matches!(parse_bytes("lots"), Err(QuantityError::Syntax(_))));
        assert!(matches!(parse_bytes("12XB"), Err(QuantityError::Syntax(_))));
        assert!(matches!(
            parse_bytes("1.2.3"),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(parse_bytes(""), Err(QuantityError::Syntax(_))));
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_bytes("17Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for b in [0u64, 1000, 1 << 10, 512 << 20, 3 << 30, (1 << 30) + 1] {
            assert_eq!(parse_bytes(&format_bytes(b)), Ok(b));
        }
        assert_eq!(format_bytes(512 << 20), "512Mi");
    }
}
