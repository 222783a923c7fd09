//! The `error` member of a first chunk's JSON, read without building a tree.
//!
//! The in-band rules need three things of a JSON first chunk: whether it is an object
//! with a top-level `error` that is not `null`, and if so that error's codes (the string
//! itself, or its `type`, `code` and `status`). A JSON library would parse the whole
//! chunk into a tree of owned values to answer that, for every first chunk that
//! mentions `"error"`, and would be a dependency of every user. This reads the chunk
//! once, keeps nothing but the codes (borrowed unless a string has escapes), and
//! accepts exactly the documents a JSON parser accepts: anything malformed is not an
//! error document.

use std::borrow::Cow;

/// Nesting deeper than this is refused, as JSON parsers do, so that hostile input
/// cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

/// The codes of the document's top-level `error`, in the order `type`, `code`,
/// `status` (or the error itself, when it is a string); `None` when `data` is not a
/// JSON object with a top-level `error` that is not `null`. A code is a string or an
/// integer (a number with a fraction or an exponent is no code: it could never equal
/// a status). When a key repeats, the last one counts.
pub(crate) fn error_codes(data: &[u8]) -> Option<Vec<Cow<'_, str>>> {
    let mut json = Reader { bytes: data, at: 0 };
    let mut error = None;
    json.object(0, |json, key| {
        if key == "error" {
            error = Some(json.error()?);
        } else {
            json.skip(1)?;
        }
        Some(())
    })?;
    json.whitespace();
    if json.at != data.len() {
        return None;
    }
    error.flatten()
}

/// A JSON number as an integer code, as written (JSON integers have no leading zeros
/// or `+`); `None` for a number with a fraction or an exponent, `-0`, or one too large
/// for 64 bits: JSON libraries read those as floating point.
fn integer(number: &str) -> Option<Cow<'_, str>> {
    let float = number.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) || number == "-0";
    let fits = number.parse::<i64>().is_ok() || number.parse::<u64>().is_ok();
    (fits && !float).then_some(Cow::Borrowed(number))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.whitespace();
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    fn literal(&mut self, text: &[u8]) -> Option<()> {
        let end = self.at.checked_add(text.len())?;
        (self.bytes.get(self.at..end) == Some(text)).then(|| self.at = end)
    }

    /// An object at `depth`, calling `member` with each key, the reader at its value.
    fn object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Option<()>,
    ) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.eat(b'{')?;
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Some(());
        }
        loop {
            self.whitespace();
            let key = self.string()?;
            self.eat(b':')?;
            self.whitespace();
            member(self, key)?;
            self.whitespace();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The top-level `error`'s value: `Some(None)` for `null`, its codes otherwise.
    fn error(&mut self) -> Option<Option<Vec<Cow<'a, str>>>> {
        Some(match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                None
            }
            b'"' => Some(vec![self.string()?]),
            b'{' => {
                let mut fields: [Option<Cow<'a, str>>; 3] = [None, None, None];
                self.object(1, |json, key| {
                    let slot = ["type", "code", "status"].iter().position(|k| *k == key);
                    match (slot, json.peek()?) {
                        (Some(slot), b'"') => fields[slot] = Some(json.string()?),
                        (Some(slot), b'-' | b'0'..=b'9') => fields[slot] = integer(json.number()?),
                        (Some(slot), _) => {
                            fields[slot] = None;
                            json.skip(2)?;
                        }
                        (None, _) => json.skip(2)?,
                    }
                    Some(())
                })?;
                Some(fields.into_iter().flatten().collect())
            }
            // An error of another kind (a number, a list): an error, with no code.
            _ => {
                self.skip(1)?;
                Some(Vec::new())
            }
        })
    }

    /// Any value at `depth`, checked and passed over.
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.object(depth, |json, _| json.skip(depth + 1)),
            b'[' => {
                self.at += 1;
                self.whitespace();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Some(());
                }
                loop {
                    self.whitespace();
                    self.skip(depth + 1)?;
                    self.whitespace();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b']' => {
                            self.at += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(drop),
        }
    }

    /// A number, as written: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.digits_required()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.digits_required()?;
        }
        // Only ASCII was accepted above.
        std::str::from_utf8(&self.bytes[start..self.at]).ok()
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
    }

    fn digits_required(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    /// A string, borrowed when it has no escapes.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        if self.peek() != Some(b'"') {
            return None;
        }
        self.at += 1;
        let start = self.at;
        // The common case: no escape before the closing quote.
        loop {
            match self.peek()? {
                b'"' => {
                    let text = std::str::from_utf8(&self.bytes[start..self.at]).ok()?;
                    self.at += 1;
                    return Some(Cow::Borrowed(text));
                }
                b'\\' => break,
                byte if byte < 0x20 => return None,
                _ => self.at += 1,
            }
        }
        let mut text = String::from(std::str::from_utf8(&self.bytes[start..self.at]).ok()?);
        loop {
            let run = self.at;
            while !matches!(self.peek()?, b'"' | b'\\') {
                if self.peek()? < 0x20 {
                    return None;
                }
                self.at += 1;
            }
            text.push_str(std::str::from_utf8(&self.bytes[run..self.at]).ok()?);
            if self.peek()? == b'"' {
                self.at += 1;
                return Some(Cow::Owned(text));
            }
            self.at += 1;
            let escaped = self.peek()?;
            self.at += 1;
            text.push(match escaped {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => self.escaped_char()?,
                _ => return None,
            });
        }
    }

    /// After `\u`: one code point, a surrogate pair taking two escapes. A lone
    /// surrogate is refused, as JSON parsers do by default.
    fn escaped_char(&mut self) -> Option<char> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                self.literal(b"\\u")?;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return None;
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return None,
            code => code,
        };
        char::from_u32(code)
    }

    fn hex4(&mut self) -> Option<u32> {
        let end = self.at.checked_add(4)?;
        let hex = std::str::from_utf8(self.bytes.get(self.at..end)?).ok()?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.at = end;
        u32::from_str_radix(hex, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// What a JSON parser makes of the same document: the reference.
    fn reference(data: &[u8]) -> Option<Vec<String>> {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(data) else {
            return None;
        };
        match object.get("error")? {
            Value::Null => None,
            Value::String(text) => Some(vec![text.clone()]),
            Value::Object(fields) => Some(
                ["type", "code", "status"]
                    .iter()
                    .filter_map(|key| fields.get(*key))
                    .filter_map(|value| match value {
                        Value::String(text) => Some(text.clone()),
                        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => Some(Vec::new()),
        }
    }

    fn codes(data: &str) -> Option<Vec<String>> {
        error_codes(data.as_bytes()).map(|codes| codes.into_iter().map(Cow::into_owned).collect())
    }

    fn agrees(data: &str) {
        assert_eq!(codes(data), reference(data.as_bytes()), "{data:?}");
    }

    #[test]
    fn reads_each_providers_errors() {
        let cases = [
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            r#"{"error":{"message":"oops","type":"server_error","param":null,"code":null}}"#,
            r#"{"error":{"type":"requests","code":"rate_limit_exceeded"}}"#,
            r#"{"error":"rate limit exceeded, retry shortly"}"#,
            r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
            r#"{"error": null}"#,
            r#"{"choices":[{"delta":{"content":"\"error\": 1"}}]}"#,
            r#"{"error":{"type":"a\"b\\c\u00e9\ud83d\ude00"}}"#,
            r#"{"error":[1,2]}"#,
            r#"{"error":7,"error":"late"}"#,
            r#"{"error":{"code":-1.5e+3}}"#,
            r#"{"error":{"code":-0}}"#,
            r#"{"error":{"code":18446744073709551615}}"#,
            r#"{"error":{"code":18446744073709551616}}"#,
            r#"{"error":{"code":-9223372036854775809}}"#,
            " {\"error\" : {\"status\" : \"X\" , \"type\":\"Y\"} } \n",
            r#"[{"error":"in a list"}]"#,
            r#"{"error":"cut"#,
            r#"{"error":"x"} trailing"#,
            r#"{"error":"\ud800"}"#,
            r#"{"error":"tab	inside"}"#,
            r#"{"error":01}"#,
            r#"{"error":{"code":1.}}"#,
            r#"{"a":tru,"error":"x"}"#,
            "{\"error\":\"x\",}",
            "",
        ];
        for data in cases {
            agrees(data);
        }
        assert_eq!(
            codes(r#"{"error":{"code":503,"status":"UNAVAILABLE","type":"t"}}"#).unwrap(),
            ["t", "503", "UNAVAILABLE"],
            "in the order type, code, status"
        );
    }

    #[test]
    fn codes_without_escapes_are_borrowed() {
        let data = br#"{"error":{"type":"overloaded_error"}}"#;
        let codes = error_codes(data).unwrap();
        assert!(matches!(codes[0], Cow::Borrowed("overloaded_error")));
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        let deep = format!(
            "{{\"x\":{}1{},\"error\":\"e\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(codes(&deep), None);
        agrees(&format!(
            "{{\"x\":{}1{},\"error\":\"e\"}}",
            "[".repeat(100),
            "]".repeat(100)
        ));
    }

    /// JSON-ish documents around an `error` member, valid or not.
    fn document() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("-0.5e2".to_owned()),
            "[0-9]{1,3}",
            "\"[a-z_ \\\\\"]{0,8}\"",
            Just("\"\\u00e9\"".to_owned()),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("type"),
                            Just("code"),
                            Just("status"),
                            Just("error"),
                            Just("m")
                        ],
                        inner
                    ),
                    0..4
                )
                .prop_map(|members| {
                    let members: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        });
        (value, "[ ,{}\\[\\]:\"a-z0-9]{0,2}", 0..3usize).prop_map(|(doc, noise, at)| {
            // Sometimes broken: noise inserted somewhere.
            let mut doc = doc;
            if at == 0 {
                let cut = doc.len() / 2;
                if doc.is_char_boundary(cut) {
                    doc.insert_str(cut, &noise);
                }
            }
            doc
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn agrees_with_a_json_parser(doc in document()) {
            prop_assert_eq!(codes(&doc), reference(doc.as_bytes()), "{:?}", doc);
        }
    }
}
