//! `tojson` as Hugging Face templates expect it: Python's `json.dumps(x, ensure_ascii=False)`,
//! which transformers installs as the filter (and llama.cpp's template engine copies).
//!
//! minijinja's own `tojson` writes compact, HTML-escaped JSON (`{"a":1}`, `\u003c`); a template
//! that prints `tools` with it would show the model a layout it never saw in training. Python
//! separates with `", "` and `": "` (`","` and `": "` with `indent`), keeps keys in their
//! order, escapes only what JSON requires and writes floats as `repr` does (`1.0`, `1e-05`).

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// The `tojson` filter: `x | tojson`, `x | tojson(indent=2)`, `sort_keys=true`,
/// `ensure_ascii=true`. Other arguments are an error naming them.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<i64> = kwargs.get("indent")?;
    let style = Style {
        indent: match indent {
            Some(n) if n < 0 => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent {n} is negative"),
                ))
            }
            n => n.map(|n| n as usize),
        },
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct Style {
    indent: Option<usize>,
    sort_keys: bool,
    ascii: bool,
}

impl Style {
    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => {
                let f = f64::try_from(v.clone())?;
                out.push_str(&float_repr(f));
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.open_close('[', ']', items.len(), depth, out, |i, out| {
                    self.write(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.open_close('{', '}', keys.len(), depth, out, |i, out| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        // Python turns int, float, bool and None keys into their JSON text.
                        None => {
                            let mut text = String::new();
                            self.write(key, depth + 1, &mut text)?;
                            self.string(&text, out);
                        }
                    }
                    out.push_str(": ");
                    self.write(&v.get_item(key)?, depth + 1, out)
                })?;
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {other} value is not JSON"),
                ))
            }
        }
        Ok(())
    }

    /// `open` items `close`, separated as Python does with or without `indent`.
    fn open_close(
        &self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            match self.indent {
                Some(n) => {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    out.extend(std::iter::repeat_n(' ', n * (depth + 1)));
                }
                None if i > 0 => out.push_str(", "),
                None => {}
            }
            item(i, out)?;
        }
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python writes it: `\"`, `\\`, the short escapes, `\u00XX` for other
    /// control characters; everything else as it is (or `\uXXXX` pairs with `ensure_ascii`).
    fn string(&self, s: &str, out: &mut String) {
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
                c if (c as u32) < 0x20 || (self.ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr`: the shortest digits that round-trip, positional for exponents
/// from -4 to 15 (`0.0001`, `1e+16`, `1e-05`), always with a `.0` or an exponent;
/// `NaN`/`Infinity` as `json.dumps` writes them.
fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e3", "-1e-5", "0e0".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let positional = format!("{f}");
        if positional.contains('.') {
            positional
        } else {
            format!("{positional}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn render(template: &str, json: &str) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        env.render_str(template, minijinja::context! { x => value })
            .unwrap()
    }

    /// Expected strings are Python 3's `json.dumps(x, ensure_ascii=False, ...)`.
    #[test]
    fn matches_python_json_dumps() {
        let x = r#"{"type": "object", "properties": {"city": {"type": "string", "description": "São Paulo <b> & \"q\"\n"}}, "required": ["city"], "n": [1, -2.5, 1.0, 1e-05, 1e20, 0.0001, 123456789012345678, true, null], "e": {}, "l": []}"#;
        assert_eq!(
            render("{{ x | tojson }}", x),
            r#"{"type": "object", "properties": {"city": {"type": "string", "description": "São Paulo <b> & \"q\"\n"}}, "required": ["city"], "n": [1, -2.5, 1.0, 1e-05, 1e+20, 0.0001, 123456789012345678, true, null], "e": {}, "l": []}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2) }}", r#"{"b": [1, {}], "a": "é"}"#),
            "{\n  \"b\": [\n    1,\n    {}\n  ],\n  \"a\": \"é\"\n}"
        );
        assert_eq!(
            render(
                "{{ x | tojson(sort_keys=true, ensure_ascii=true) }}",
                r#"{"b": "é😀", "a": "\u0001"}"#
            ),
            r#"{"a": "\u0001", "b": "\u00e9\ud83d\ude00"}"#
        );
    }

    #[test]
    fn unknown_arguments_are_refused() {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let err = env
            .render_str("{{ 1 | tojson(separators=1) }}", minijinja::context! {})
            .unwrap_err();
        assert!(err.to_string().contains("separators"), "{err}");
    }

    #[test]
    fn floats_as_python_repr() {
        for (f, want) in [
            (0.1, "0.1"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (-0.0, "-0.0"),
            (123.456, "123.456"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }
}
