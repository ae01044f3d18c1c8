//! Exact decimal amounts for the Xero connector: parsed from the contract's
//! decimal strings, compared exactly, and written to JSON as numbers with
//! the same digits (serde_json's `arbitrary_precision`), never as floats.

use serde_json::Value;
use std::cmp::Ordering;

/// A decimal as mantissa and scale (`12.50` = 1250, scale 2).
#[derive(Debug, Clone, Copy, Default)]
pub struct Amount {
    mantissa: i128,
    scale: u32,
}

impl Amount {
    /// Parse `-?digits(.digits)?` (at most 28 digits); anything else is None.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        let (neg, body) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if int.len() + frac.len() > 28 || (body.contains('.') && frac.is_empty()) {
            return None;
        }
        // Up to 18 digits fit a u64, whose arithmetic is native on wasm32
        // (i128's multiply is a library call); longer ones take i128.
        let digits = int.bytes().chain(frac.bytes());
        let m: i128 = if int.len() + frac.len() <= 18 {
            i128::from(digits.fold(0u64, |m, b| m * 10 + u64::from(b - b'0')))
        } else {
            digits.fold(0i128, |m, b| m * 10 + i128::from(b - b'0'))
        };
        Some(Self {
            mantissa: if neg { -m } else { m },
            scale: frac.len() as u32,
        })
    }

    /// Read a JSON number or numeric string.
    pub fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Number(n) => Self::parse(&n.to_string()),
            Value::String(s) => Self::parse(s),
            _ => None,
        }
    }

    /// Decimal places as written.
    pub fn scale(&self) -> u32 {
        self.scale
    }

    /// Whether it has at most `places` decimal places once trailing zeros
    /// are set aside (`1.500` fits 2, `1.505` does not).
    pub fn fits_decimals(&self, places: u32) -> bool {
        if self.scale <= places {
            return true;
        }
        // The digits below `places` must all be zero; 10^(scale - places)
        // fits i128 for the 28 digits `parse` takes.
        10i128
            .checked_pow(self.scale - places)
            .is_some_and(|p| self.mantissa % p == 0)
    }

    /// Whether it is zero.
    pub fn is_zero(&self) -> bool {
        self.mantissa == 0
    }

    /// The mantissa at a larger scale; None when it does not fit in i128
    /// (28 digits moved by up to 28 places can reach 10^56).
    fn rescaled(&self, scale: u32) -> Option<i128> {
        10i128
            .checked_pow(scale - self.scale)
            .and_then(|p| self.mantissa.checked_mul(p))
    }

    /// The sum, at the larger scale; None when it does not fit.
    pub fn checked_add(&self, other: &Self) -> Option<Self> {
        let scale = self.scale.max(other.scale);
        Some(Self {
            mantissa: self.rescaled(scale)?.checked_add(other.rescaled(scale)?)?,
            scale,
        })
    }

    /// The digits as text.
    pub fn text(&self) -> String {
        let magnitude = self.mantissa.unsigned_abs();
        // u128 formatting divides in software on wasm32; nearly every
        // amount fits in 64 bits.
        let digits = match u64::try_from(magnitude) {
            Ok(m) => m.to_string(),
            Err(_) => magnitude.to_string(),
        };
        let s = self.scale as usize;
        let mut out = String::with_capacity(digits.len() + s + 3);
        if self.mantissa < 0 {
            out.push('-');
        }
        if s == 0 {
            out.push_str(&digits);
        } else if digits.len() > s {
            out.push_str(&digits[..digits.len() - s]);
            out.push('.');
            out.push_str(&digits[digits.len() - s..]);
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', s - digits.len()));
            out.push_str(&digits);
        }
        out
    }
}

/// Written as a JSON number with exactly these digits (through
/// `arbitrary_precision`, never a float).
impl serde::Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        self.text()
            .parse::<serde_json::Number>()
            .map_err(S::Error::custom)?
            .serialize(s)
    }
}

impl PartialEq for Amount {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Amount {}
impl PartialOrd for Amount {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Amount {
    fn cmp(&self, other: &Self) -> Ordering {
        let s = self.scale.max(other.scale);
        match (self.rescaled(s), other.rescaled(s)) {
            (Some(a), Some(b)) => a.cmp(&b),
            // Only the one with the smaller scale is moved, and the other's
            // mantissa (< 10^28) fits; the one that overflowed is larger in
            // magnitude, so its sign decides.
            (None, _) if self.mantissa < 0 => Ordering::Less,
            (None, _) => Ordering::Greater,
            (_, None) if other.mantissa < 0 => Ordering::Greater,
            (_, None) => Ordering::Less,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_exactly_at_the_larger_scale() {
        let a = |t: &str| Amount::parse(t).unwrap();
        assert_eq!(
            a("9330.49").checked_add(&a("0.5")).unwrap().text(),
            "9330.99"
        );
        assert_eq!(a("-1.25").checked_add(&a("1")).unwrap().text(), "-0.25");
        assert_eq!(
            Amount::default().checked_add(&a("7.10")).unwrap().text(),
            "7.10"
        );
        let big = a("9999999999999999999999999999");
        assert!(
            big.checked_add(&a("0.000000000000000000000000001"))
                .is_none()
        );
    }

    #[test]
    fn parses_and_writes_exactly() {
        for t in [
            "0",
            "6250.00",
            "41.3119",
            "-5.5",
            "0.01",
            "123456789012345678.1234",
            // Both sides of the 18-digit fast path.
            "99999999999999999.9",
            "999999999999999999.9",
            "-9999999999999999.99",
        ] {
            assert_eq!(Amount::parse(t).unwrap().text(), t);
            assert_eq!(
                serde_json::to_value(Amount::parse(t).unwrap())
                    .unwrap()
                    .to_string(),
                t
            );
            assert_eq!(
                serde_json::to_string(&Amount::parse(t).unwrap()).unwrap(),
                t
            );
        }
        for bad in ["", "1e5", "12.", ".", "1,5", "abc", "--1", "NaN"] {
            assert!(Amount::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn fits_decimals_sets_trailing_zeros_aside() {
        let fits = |t: &str| Amount::parse(t).unwrap().fits_decimals(2);
        for t in ["1", "1.5", "1.50", "1.500", "-0.010", "0.0000"] {
            assert!(fits(t), "{t}");
        }
        for t in ["1.505", "-0.001", "1000.125", "0.0000001"] {
            assert!(!fits(t), "{t}");
        }
    }

    #[test]
    fn compares_across_scales() {
        assert_eq!(
            Amount::parse("1.50").unwrap(),
            Amount::parse("1.5").unwrap()
        );
        assert!(Amount::parse("0.1").unwrap() < Amount::parse("0.11").unwrap());
        assert!(Amount::parse("0.00").unwrap().is_zero());
        // 28 digits against 27 decimals: rescaling overflows i128.
        let big = Amount::parse("4531102612324095290565716222").unwrap();
        let small = Amount::parse("1.000000000000000000000000001").unwrap();
        assert!(big > small);
        assert!(small < big);
        let neg = Amount::parse("-4531102612324095290565716222").unwrap();
        assert!(neg < small);
        assert!(small > neg);
    }
}
