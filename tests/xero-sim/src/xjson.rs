//! Xero's JSON conventions: `/Date(ms+0000)/` dates, decimals as JSON
//! numbers, lenient reading of request values, and the error bodies Xero
//! sends (ValidationException, problem details).

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Map, Value, json};
use std::str::FromStr;

/// `/Date(1700000000000+0000)/` for a timestamp.
pub fn ms_date(t: DateTime<Utc>) -> String {
    format!("/Date({}+0000)/", t.timestamp_millis())
}

/// `/Date(1700000000000)/` (the envelope's `DateTimeUTC` form).
pub fn ms_date_plain(t: DateTime<Utc>) -> String {
    format!("/Date({})/", t.timestamp_millis())
}

/// `/Date(ms+0000)/` for a calendar date (midnight UTC).
pub fn ms_day(d: NaiveDate) -> String {
    ms_date(day_start(d))
}

/// `2026-11-25T00:00:00` (the `DateString` form).
pub fn day_string(d: NaiveDate) -> String {
    format!("{}T00:00:00", d.format("%Y-%m-%d"))
}

fn day_start(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// Parse a request date: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SS[...]` or `/Date(ms[+zzzz])/`.
pub fn parse_day(s: &str) -> Option<NaiveDate> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix("/Date(").and_then(|r| r.strip_suffix(")/")) {
        let digits_end = inner
            .char_indices()
            .find(|(i, c)| !(c.is_ascii_digit() || (*i == 0 && *c == '-')))
            .map(|(i, _)| i)
            .unwrap_or(inner.len());
        let ms: i64 = inner[..digits_end].parse().ok()?;
        return DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.date_naive());
    }
    if s.len() >= 10 && s.is_char_boundary(10) {
        let d = NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").ok()?;
        if s.len() == 10 || s[10..].starts_with('T') || s[10..].starts_with(' ') {
            return Some(d);
        }
    }
    None
}

/// A decimal as a JSON number (exact for the 2–4 decimal places used for money).
pub fn num(d: Decimal) -> Value {
    let d = d.normalize();
    if d.scale() == 0
        && let Some(i) = d.to_i64()
    {
        // Xero prints money with a decimal point; keep it a float so "100" reads as 100.0.
        return serde_json::Number::from_f64(i as f64)
            .map(Value::Number)
            .unwrap_or(Value::Null);
    }
    d.to_f64()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Read a decimal from a JSON number or numeric string.
pub fn as_decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => {
            let s = n.to_string();
            Decimal::from_str(&s)
                .ok()
                .or_else(|| Decimal::from_scientific(&s).ok())
        }
        Value::String(s) => Decimal::from_str(s.trim()).ok(),
        _ => None,
    }
}

/// A non-empty string field of an object.
pub fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A field as a `Value::String` when present and a string, else nothing.
pub fn opt_str(obj: &Map<String, Value>, key: &str) -> Option<String> {
    str_field(obj, key).map(String::from)
}

/// The body of Xero's HTTP 400 ValidationException.
pub fn validation_exception(elements: Vec<Value>) -> Value {
    json!({
        "ErrorNumber": 10,
        "Type": "ValidationException",
        "Message": "A validation exception occurred",
        "Elements": elements,
    })
}

/// `[{"Message": ...}, ...]`.
pub fn validation_errors(msgs: &[String]) -> Value {
    Value::Array(msgs.iter().map(|m| json!({ "Message": m })).collect())
}

/// Xero's problem-details body (`401`/`403` on the accounting API).
pub fn problem(title: &str, status: u16, detail: &str) -> Value {
    json!({ "Type": Value::Null, "Title": title, "Status": status, "Detail": detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let d = NaiveDate::from_ymd_opt(2026, 11, 25).unwrap();
        assert_eq!(parse_day("2026-11-25"), Some(d));
        assert_eq!(parse_day("2026-11-25T00:00:00"), Some(d));
        assert_eq!(parse_day(&ms_day(d)), Some(d));
        assert_eq!(parse_day("/Date(1795564800000)/"), Some(d));
        assert_eq!(parse_day("25/11/2026"), None);
        assert_eq!(parse_day("2026-13-01"), None);
        assert_eq!(parse_day("2026-11-25é"), None);
        assert_eq!(day_string(d), "2026-11-25T00:00:00");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(Decimal::new(11550, 2)).to_string(), "115.5");
        assert_eq!(num(Decimal::new(100, 0)).to_string(), "100.0");
        assert_eq!(as_decimal(&json!(0.1)), Some(Decimal::new(1, 1)));
        assert_eq!(as_decimal(&json!("12.3456")), Some(Decimal::new(123456, 4)));
        assert_eq!(as_decimal(&json!(true)), None);
    }
}
