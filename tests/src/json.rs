//! Reading `qpnet stats --json` in tests: [`parse`] gives a
//! [`serde_json::Value`] (re-exported as [`Value`], so tests write
//! `json::Value::as_u64`), and a few accessors fail with what they looked
//! for and a short rendering of where ([`Brief`]), so a failed check shows
//! the document it read.

use anyhow::{Context, Result};
pub use serde_json::Value;

/// Longest rendering [`Brief::brief`] gives before it cuts.
const BRIEF_MAX_CHARS: usize = 2_000;

/// Parse one JSON document (surrounding whitespace allowed, nothing after).
pub fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text).context("parsing JSON")
}

/// A short rendering of a value for error messages.
pub trait Brief {
    /// Compact JSON, cut after [`BRIEF_MAX_CHARS`] characters.
    fn brief(&self) -> String;
}

impl Brief for Value {
    fn brief(&self) -> String {
        let s = self.to_string();
        if s.chars().count() > BRIEF_MAX_CHARS {
            format!("{}...", s.chars().take(BRIEF_MAX_CHARS).collect::<String>())
        } else {
            s
        }
    }
}

/// The unsigned integer member `key` of `v`.
pub fn num(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .with_context(|| format!("no numeric {key:?} in {}", v.brief()))
}

/// The array member `key` of `v`.
pub fn array<'a>(v: &'a Value, key: &str) -> Result<&'a [Value]> {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .with_context(|| format!("no {key:?} array"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_read_and_misses_say_where() {
        let doc =
            parse(r#" {"n": 18446744073709551615, "a": [1, {"s": "x\"y"}], "f": 1.5} "#).unwrap();
        assert_eq!(num(&doc, "n").unwrap(), u64::MAX);
        assert_eq!(array(&doc, "a").unwrap().len(), 2);
        assert_eq!(doc["a"][1]["s"].as_str(), Some("x\"y"));
        assert!(num(&doc, "f").is_err());
        let e = format!("{:#}", num(&doc, "nope").unwrap_err());
        assert!(
            e.contains("\"nope\"") && e.contains("18446744073709551615"),
            "{e}"
        );
        assert_eq!(
            format!("{:#}", array(&doc, "n").unwrap_err()),
            "no \"n\" array"
        );
        assert!(parse("{\"a\": 1} x").is_err());
        let long = Value::String("z".repeat(3_000));
        assert_eq!(long.brief().chars().count(), BRIEF_MAX_CHARS + 3);
    }
}
