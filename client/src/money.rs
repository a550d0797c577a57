//! Money as people type and read it: yuan with two decimals ("12.34"), converted exactly to
//! and from integer cents. No floating point anywhere.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("amount {input:?}: {reason}")]
pub struct ParseAmountError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses "12", "12.3" or "12.34" (yuan) into cents.
pub fn parse_yuan(input: &str) -> Result<u64, ParseAmountError> {
    let err = |reason| ParseAmountError { input: input.to_string(), reason };
    let s = input.trim();
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected yuan like 12.34"));
    }
    if frac.len() > 2 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("at most two decimals (cents)"));
    }
    let yuan: u64 = whole.parse().map_err(|_| err("too large"))?;
    let cents: u64 = format!("{frac:0<2}").parse().map_err(|_| err("bad decimals"))?;
    yuan.checked_mul(100).and_then(|c| c.checked_add(cents)).ok_or_else(|| err("too large"))
}

/// Formats cents as yuan with two decimals.
pub fn format_yuan(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_yuan("12.34"), Ok(1234));
        assert_eq!(parse_yuan("12.3"), Ok(1230));
        assert_eq!(parse_yuan("12"), Ok(1200));
        assert_eq!(parse_yuan("0.01"), Ok(1));
        assert_eq!(parse_yuan("0.07"), Ok(7));
    }

    #[test]
    fn rejects_what_is_not_money() {
        for bad in ["", "-1", "1.234", "1e3", "abc", ".5", "1.x", "184467440737095516.16"] {
            assert!(parse_yuan(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_with_two_decimals() {
        assert_eq!(format_yuan(1234), "12.34");
        assert_eq!(format_yuan(5), "0.05");
        assert_eq!(format_yuan(100), "1.00");
    }
}
