//! Named limits on what a request may carry (DESIGN section 8) and the checks that enforce
//! them before anything is proposed.
//!
//! Invariant: every check here is pure and cheap, and runs before a byte is stored; the
//! same limits travel inside each log entry so replicas re-check patched results identically.

use super::DocError;
use serde::{Deserialize, Serialize};

/// Request limits. Defaults follow DESIGN section 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest document, in bytes of its compact JSON text.
    pub doc_bytes_max: usize,
    /// Deepest nesting of objects and arrays.
    pub nesting_depth_max: usize,
    /// Longest document id, in UTF-8 bytes.
    pub id_bytes_max: usize,
    /// Longest tenant or collection name, in bytes.
    pub name_bytes_max: usize,
    /// Most operations in one atomic batch or batch get.
    pub batch_ops_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            doc_bytes_max: 1 << 20,
            nesting_depth_max: 64,
            id_bytes_max: 512,
            name_bytes_max: 128,
            batch_ops_max: 1000,
        }
    }
}

/// Checks a document id: non-empty, at most `id_bytes_max` bytes, no control characters.
pub fn check_id(id: &str, limits: &Limits) -> Result<(), DocError> {
    if id.is_empty() {
        return Err(DocError::InvalidId("document id is empty".into()));
    }
    if id.len() > limits.id_bytes_max {
        return Err(DocError::InvalidId(format!(
            "document id is {} bytes, the limit is {}",
            id.len(),
            limits.id_bytes_max
        )));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(DocError::InvalidId(format!("document id contains the control character U+{:04X}", c as u32)));
    }
    Ok(())
}

/// Checks a tenant or collection name: 1..=name_bytes_max bytes of `[A-Za-z0-9_.-]`,
/// not starting with `.` (reserved).
pub fn check_name(what: &str, name: &str, limits: &Limits) -> Result<(), DocError> {
    if name.is_empty() {
        return Err(DocError::InvalidName(format!("{what} name is empty")));
    }
    if name.len() > limits.name_bytes_max {
        return Err(DocError::InvalidName(format!(
            "{what} name is {} bytes, the limit is {}",
            name.len(),
            limits.name_bytes_max
        )));
    }
    if name.starts_with('.') {
        return Err(DocError::InvalidName(format!("{what} name {name:?} starts with '.', which is reserved")));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')) {
        return Err(DocError::InvalidName(format!(
            "{what} name {name:?} contains {c:?}; allowed are letters, digits, '_', '-' and '.'"
        )));
    }
    Ok(())
}

/// Depth of the deepest object/array nesting in JSON text, counted without parsing, so a
/// hostile 100,000-deep input is refused before the parser recurses into it.
pub fn nesting_depth(json: &str) -> usize {
    let mut depth = 0usize;
    let mut max = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses and checks a document body: size, nesting, valid JSON, a JSON object. Returns the
/// canonical compact text that is stored.
pub fn parse_document(json: &str, limits: &Limits) -> Result<(serde_json::Value, String), DocError> {
    if json.len() > limits.doc_bytes_max {
        return Err(DocError::TooLarge { size_bytes: json.len(), limit_bytes: limits.doc_bytes_max });
    }
    check_depth(json, limits)?;
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| DocError::InvalidJson(e.to_string()))?;
    let text = check_value(&value, limits)?;
    Ok((value, text))
}

/// Parses a patch body (any JSON value) with the size and nesting checks.
pub fn parse_patch(json: &str, limits: &Limits) -> Result<serde_json::Value, DocError> {
    if json.len() > limits.doc_bytes_max {
        return Err(DocError::TooLarge { size_bytes: json.len(), limit_bytes: limits.doc_bytes_max });
    }
    check_depth(json, limits)?;
    serde_json::from_str(json).map_err(|e| DocError::InvalidJson(e.to_string()))
}

fn check_depth(json: &str, limits: &Limits) -> Result<(), DocError> {
    let depth = nesting_depth(json);
    if depth > limits.nesting_depth_max {
        return Err(DocError::TooDeep { depth, limit: limits.nesting_depth_max });
    }
    Ok(())
}

/// Checks an already-parsed document (e.g. the result of a patch): an object, within the size
/// and nesting limits. Returns its canonical compact text.
pub fn check_value(value: &serde_json::Value, limits: &Limits) -> Result<String, DocError> {
    if !value.is_object() {
        return Err(DocError::NotAnObject);
    }
    let text = value.to_string();
    if text.len() > limits.doc_bytes_max {
        return Err(DocError::TooLarge { size_bytes: text.len(), limit_bytes: limits.doc_bytes_max });
    }
    check_depth(&text, limits)?;
    Ok(text)
}

/// Cheap, non-recursive check that `value` is within the nesting limit and that its JSON
/// text cannot be under the size limit (a lower bound of the serialized size is computed,
/// stopping as soon as either limit is passed).
pub fn check_bounds(value: &serde_json::Value, limits: &Limits) -> Result<(), DocError> {
    use serde_json::Value;
    let mut size = 0usize;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        let (own, children_depth) = match v {
            Value::Null | Value::Bool(_) => (4, depth),
            Value::Number(_) => (1, depth),
            Value::String(s) => (s.len() + 2, depth),
            Value::Array(items) => {
                stack.extend(items.iter().map(|i| (i, depth + 1)));
                (2 + items.len(), depth + 1)
            }
            Value::Object(map) => {
                for (k, item) in map {
                    size += k.len() + 3;
                    stack.push((item, depth + 1));
                }
                (2, depth + 1)
            }
        };
        size += own;
        if children_depth > limits.nesting_depth_max {
            return Err(DocError::TooDeep { depth: children_depth, limit: limits.nesting_depth_max });
        }
        if size > limits.doc_bytes_max {
            return Err(DocError::TooLarge { size_bytes: size, limit_bytes: limits.doc_bytes_max });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let l = Limits::default();
        assert!(check_id("a", &l).is_ok());
        assert!(check_id("ünïcødé/with spaces", &l).is_ok());
        assert!(matches!(check_id("", &l), Err(DocError::InvalidId(_))));
        assert!(matches!(check_id("a\nb", &l), Err(DocError::InvalidId(_))));
        assert!(matches!(check_id("a\0b", &l), Err(DocError::InvalidId(_))));
        assert!(matches!(check_id(&"x".repeat(513), &l), Err(DocError::InvalidId(_))));
        assert!(check_id(&"x".repeat(512), &l).is_ok());
    }

    #[test]
    fn names() {
        let l = Limits::default();
        assert!(check_name("collection", "users_v2.archive-1", &l).is_ok());
        assert!(check_name("collection", "", &l).is_err());
        assert!(check_name("collection", ".system", &l).is_err());
        assert!(check_name("collection", "a/b", &l).is_err());
        assert!(check_name("collection", "a\0", &l).is_err());
    }

    #[test]
    fn bounds_agree_with_the_text_checks() {
        let l = Limits::default();
        let ok: serde_json::Value = serde_json::from_str(r#"{"a":[1,{"b":"x"}],"c":null}"#).unwrap();
        assert!(check_bounds(&ok, &l).is_ok());
        let deep: serde_json::Value =
            serde_json::from_str(&format!("{{\"a\":{}{}}}", "[".repeat(64), "]".repeat(64))).unwrap();
        assert!(matches!(check_bounds(&deep, &l), Err(DocError::TooDeep { .. })));
        assert!(matches!(check_value(&deep, &l), Err(DocError::TooDeep { .. })));
        let small = Limits { doc_bytes_max: 10, ..Limits::default() };
        let big: serde_json::Value = serde_json::json!({"k": "0123456789"});
        assert!(matches!(check_bounds(&big, &small), Err(DocError::TooLarge { .. })));
    }

    #[test]
    fn depth_counts_outside_strings_only() {
        assert_eq!(nesting_depth(r#"{"a":{"b":[1,{"c":2}]}}"#), 4);
        assert_eq!(nesting_depth(r#"{"a":"{{{{[[[["}"#), 1);
        assert_eq!(nesting_depth(r#"{"a":"\"{{"}"#), 1);
        assert_eq!(nesting_depth("3"), 0);
    }

    #[test]
    fn documents() {
        let l = Limits::default();
        let (_, text) = parse_document(r#"{ "b": 1, "a": [true] }"#, &l).unwrap();
        assert_eq!(text, r#"{"a":[true],"b":1}"#);
        assert!(matches!(parse_document("{", &l), Err(DocError::InvalidJson(_))));
        assert!(matches!(parse_document("[1]", &l), Err(DocError::NotAnObject)));
        assert!(matches!(parse_document("\"s\"", &l), Err(DocError::NotAnObject)));
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(matches!(parse_document(&format!("{{\"a\":{deep}}}"), &l), Err(DocError::TooDeep { .. })));
        let ok_deep = format!("{{\"a\":{}{}}}", "[".repeat(63), "]".repeat(63));
        assert!(parse_document(&ok_deep, &l).is_ok());
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(1 << 20));
        assert!(matches!(parse_document(&big, &l), Err(DocError::TooLarge { .. })));
        let hostile = "[".repeat(200_000);
        assert!(matches!(parse_document(&hostile, &l), Err(DocError::TooDeep { .. })));
    }
}
