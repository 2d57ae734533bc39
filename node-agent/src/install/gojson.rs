//! JSON rendering exactly as Go's `json.MarshalIndent(v, "", "  ")` renders a decoded `map[string]any`, plus the
//! trailing newline Istio appends. Istio round-trips every conflist through a Go map, so the file it writes has
//! sorted keys, two-space indentation, HTML-safe string escapes and Go's float formatting; rendering the same way
//! makes our output byte-identical to Istio's for the same input. Pure.

use serde_json::{Map, Number, Value};

/// Renders a value with sorted object keys, as Go renders a `map[string]any`, followed by a newline.
pub fn render_sorted(value: &Value) -> Vec<u8> {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out.push('\n');
    out.into_bytes()
}

/// Renders an object whose top-level keys keep the given order (a Go struct), nested values sorted, then a newline.
pub fn render_ordered(fields: &[(&str, Value)]) -> Vec<u8> {
    let mut out = String::new();
    write_object(
        &mut out,
        fields.iter().map(|(k, v)| (*k, v)),
        fields.len(),
        0,
    );
    out.push('\n');
    out.into_bytes()
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                indent(out, depth + 1);
                write_value(out, item, depth + 1);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) => write_sorted_object(out, map, depth),
    }
}

fn write_sorted_object(out: &mut String, map: &Map<String, Value>, depth: usize) {
    // Go sorts map keys by their bytes; `str`'s ordering is bytewise too. Sort explicitly: serde_json's map keeps
    // insertion order when another crate in the build enables its `preserve_order` feature.
    let mut entries: Vec<(&str, &Value)> = map.iter().map(|(k, v)| (k.as_str(), v)).collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let len = entries.len();
    write_object(out, entries.into_iter(), len, depth);
}

fn write_object<'a>(
    out: &mut String,
    entries: impl Iterator<Item = (&'a str, &'a Value)>,
    len: usize,
    depth: usize,
) {
    if len == 0 {
        out.push_str("{}");
        return;
    }
    out.push_str("{\n");
    for (i, (key, value)) in entries.enumerate() {
        indent(out, depth + 1);
        write_string(out, key);
        out.push_str(": ");
        write_value(out, value, depth + 1);
        if i + 1 < len {
            out.push(',');
        }
        out.push('\n');
    }
    indent(out, depth);
    out.push('}');
}

/// Go's encoder escapes `<`, `>`, `&`, U+2028 and U+2029 (HTML safety) and control characters; `\b`, `\f`, `\n`,
/// `\r`, `\t` get their short forms.
fn write_string(out: &mut String, s: &str) {
    write_string_escaping(out, s, |_| false);
}

/// [`write_string`], with the characters `also` names written as `\uXXXX` too (the kubeconfig's YAML scalars).
pub(crate) fn write_string_escaping(out: &mut String, s: &str, also: impl Fn(char) -> bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 || also(c) => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Integers are written exactly (Go would round those beyond 2^53 through float64: we do not reproduce that loss).
/// Floats follow Go: shortest round-trip digits, plain notation for 1e-6 <= |x| < 1e21, otherwise `1e+21`/`1e-7`.
fn write_number(out: &mut String, n: &Number) {
    if n.is_i64() || n.is_u64() {
        out.push_str(&n.to_string());
        return;
    }
    let Some(f) = n.as_f64() else {
        out.push_str(&n.to_string());
        return;
    };
    let abs = f.abs();
    if abs == 0.0 || (1e-6..1e21).contains(&abs) {
        out.push_str(&format!("{f}"));
    } else {
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => {
                out.push_str(mantissa);
                out.push_str("e+");
                out.push_str(exp);
            }
            _ => out.push_str(&s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &Value) -> String {
        String::from_utf8(render_sorted(v)).unwrap()
    }

    #[test]
    fn sorts_keys_and_indents_like_go() {
        let v = json!({"b": 1, "a": {"d": [], "c": {}}, "e": [1, "x"]});
        assert_eq!(
            s(&v),
            "{\n  \"a\": {\n    \"c\": {},\n    \"d\": []\n  },\n  \"b\": 1,\n  \"e\": [\n    1,\n    \"x\"\n  ]\n}\n"
        );
    }

    #[test]
    fn escapes_like_go() {
        let v = json!("<a&b>\u{2028}\n\t\u{1}\"\\é");
        assert_eq!(
            s(&v),
            "\"\\u003ca\\u0026b\\u003e\\u2028\\n\\t\\u0001\\\"\\\\é\"\n"
        );
    }

    #[test]
    fn floats_like_go() {
        let v: Value =
            serde_json::from_str("[1.0, 0.5, 1e21, 1e-7, 1500, -3, 2.5e20, 0.0]").unwrap();
        assert_eq!(
            s(&v),
            "[\n  1,\n  0.5,\n  1e+21,\n  1e-7,\n  1500,\n  -3,\n  250000000000000000000,\n  0\n]\n"
        );
    }

    #[test]
    fn ordered_top_level() {
        let out = render_ordered(&[("z", json!(1)), ("a", json!({"y": 1, "x": 2}))]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n  \"z\": 1,\n  \"a\": {\n    \"x\": 2,\n    \"y\": 1\n  }\n}\n"
        );
    }
}
