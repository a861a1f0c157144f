//! Reading `serialize()` bytes into a [`PhpValue`], within limits, never trusting a count or
//! a length before the bytes are there, and never instantiating anything.

use super::value::{canonical_int, ArrayKey, PhpObject, PhpValue, Property};

/// What the decoder accepts at most. PHP has no such limits; a peer that exceeds them is
/// refused with a [`PhpError`] that names the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// How deeply arrays and objects nest. Default: 64.
    pub max_depth: usize,
    /// How many values (scalars, array entries, properties) one payload holds. Default:
    /// 1,000,000.
    pub max_values: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_depth: 64,
            max_values: 1_000_000,
        }
    }
}

/// Why bytes are not a PHP value this decoder accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PhpError {
    /// The bytes end before the value does.
    #[error("the PHP value ends early, at byte {at}: it was cut off")]
    Truncated {
        /// Where.
        at: usize,
    },
    /// A byte that the `serialize()` grammar does not allow there.
    #[error("byte {at} of the PHP value is {found:?} where {expected} was expected: it is not PHP serialize() output")]
    Unexpected {
        /// Where.
        at: usize,
        /// What was there.
        found: char,
        /// What the grammar wants.
        expected: &'static str,
    },
    /// A number that does not parse, or does not fit (an integer beyond `i64`, a length
    /// beyond the input).
    #[error("byte {at} of the PHP value starts a malformed or out-of-range number")]
    BadNumber {
        /// Where.
        at: usize,
    },
    /// A kind this decoder refuses on purpose: references (`r:`, `R:`), custom
    /// serialization (`C:`), enums (`E:`).
    #[error("the PHP value uses `{kind}:` at byte {at} ({what}), which is refused: send plain values and objects")]
    Refused {
        /// The type letter.
        kind: char,
        /// What it is.
        what: &'static str,
        /// Where.
        at: usize,
    },
    /// Arrays and objects nest deeper than [`DecodeLimits::max_depth`].
    #[error("the PHP value nests deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// More values than [`DecodeLimits::max_values`].
    #[error("the PHP value holds more than {limit} values")]
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// A Rust value that does not map onto PHP, or a PHP value that does not have the shape
    /// of the Rust type asked for.
    #[error("the value does not map between PHP and Rust: {message}")]
    Mapping {
        /// What did not fit.
        message: String,
    },
    /// Bytes left over after the value.
    #[error("{left} bytes follow the PHP value: one payload holds one value")]
    Trailing {
        /// How many.
        left: usize,
    },
}

impl PhpValue {
    /// Reads one value that takes all of `bytes`.
    ///
    /// # Errors
    /// A [`PhpError`] for bytes that are not one whole value, or that exceed `limits`.
    pub fn from_bytes(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, PhpError> {
        let mut reader = Reader {
            bytes,
            at: 0,
            limits,
            values: 0,
        };
        let value = reader.value(0)?;
        match bytes.len() - reader.at {
            0 => Ok(value),
            left => Err(PhpError::Trailing { left }),
        }
    }
}

/// What [`salvage`] reads of an object that does not decode.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Salvaged {
    pub(crate) class: Vec<u8>,
    /// The `id` property (any visibility), when it is an int.
    pub(crate) id: Option<i64>,
    /// The `requestId` property, when it is an int.
    pub(crate) request_id: Option<i64>,
}

/// The class, `id` and `requestId` of a top-level object that [`PhpValue::from_bytes`]
/// refuses (a reference, an enum, too deep, too many values): the other properties are
/// skipped, whatever they hold, so the frame can still be answered. `None` when even that
/// cannot be read.
pub(crate) fn salvage(bytes: &[u8]) -> Option<Salvaged> {
    // PHP's own `unserialize_max_depth` (4,096, the top object one of them): what PHP reads,
    // this reads the ids of.
    let limits = DecodeLimits {
        max_depth: 4095,
        max_values: usize::MAX,
    };
    let mut reader = Reader {
        bytes,
        at: 0,
        limits: &limits,
        values: 0,
    };
    reader.expect(b'O', "`O`").ok()?;
    reader.expect(b':', "`:`").ok()?;
    let mut salvaged = Salvaged {
        class: reader.quoted(b':').ok()?,
        ..Salvaged::default()
    };
    let count = reader.count(b':').ok()?;
    reader.expect(b'{', "`{`").ok()?;
    for _ in 0..count {
        let name = match reader.key() {
            Ok(ArrayKey::String(name)) => Property::from_mangled(&name).name,
            Ok(ArrayKey::Int(_)) => Vec::new(),
            Err(_) => break,
        };
        let slot = match name.as_slice() {
            b"id" => Some(&mut salvaged.id),
            b"requestId" => Some(&mut salvaged.request_id),
            _ => None,
        };
        // NB. Only an int is read as a value: anything else, however deep, is stepped over.
        let read = match slot {
            Some(slot) if reader.peek() == Ok(b'i') => reader.value(0).map(|value| {
                if let PhpValue::Int(value) = value {
                    *slot = Some(value);
                }
            }),
            _ => reader.skip(),
        };
        if read.is_err() {
            break;
        }
    }
    Some(salvaged)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    limits: &'a DecodeLimits,
    values: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Result<u8, PhpError> {
        self.bytes
            .get(self.at)
            .copied()
            .ok_or(PhpError::Truncated { at: self.at })
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), PhpError> {
        let found = self.peek()?;
        if found != byte {
            return Err(PhpError::Unexpected {
                at: self.at,
                found: found as char,
                expected,
            });
        }
        self.at += 1;
        Ok(())
    }

    /// The bytes up to `end` (not included), which must come before the input ends.
    fn until(&mut self, end: u8) -> Result<&[u8], PhpError> {
        let rest = &self.bytes[self.at..];
        let Some(len) = rest.iter().position(|&b| b == end) else {
            return Err(PhpError::Truncated {
                at: self.bytes.len(),
            });
        };
        let start = self.at;
        self.at += len + 1;
        Ok(&self.bytes[start..start + len])
    }

    fn integer(&mut self, end: u8) -> Result<i64, PhpError> {
        let at = self.at;
        let text = self.until(end)?;
        let digits = text
            .strip_prefix(b"-")
            .or(text.strip_prefix(b"+"))
            .unwrap_or(text);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(PhpError::BadNumber { at });
        }
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or(PhpError::BadNumber { at })
    }

    /// A length or count: an unsigned decimal no larger than the input left.
    fn count(&mut self, end: u8) -> Result<usize, PhpError> {
        let at = self.at;
        let text = self.until(end)?;
        if text.is_empty() || !text.iter().all(u8::is_ascii_digit) || text.len() > 19 {
            return Err(PhpError::BadNumber { at });
        }
        let count: usize = std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or(PhpError::BadNumber { at })?;
        // Every counted thing takes at least one byte: a larger count cannot be honest.
        if count > self.bytes.len() - self.at {
            return Err(PhpError::BadNumber { at });
        }
        Ok(count)
    }

    /// `<len>:"<bytes>"` (after `s:`), then `end`.
    fn quoted(&mut self, end: u8) -> Result<Vec<u8>, PhpError> {
        let len = self.count(b':')?;
        self.expect(b'"', "`\"`")?;
        let start = self.at;
        if self.bytes.len() - start < len {
            return Err(PhpError::Truncated {
                at: self.bytes.len(),
            });
        }
        self.at += len;
        self.expect(b'"', "`\"` after the string's length in bytes")?;
        self.expect(end, "the end of the string")?;
        Ok(self.bytes[start..start + len].to_vec())
    }

    fn counted(&mut self) -> Result<(), PhpError> {
        self.values += 1;
        if self.values > self.limits.max_values {
            return Err(PhpError::TooMany {
                limit: self.limits.max_values,
            });
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<PhpValue, PhpError> {
        self.counted()?;
        let at = self.at;
        let kind = self.peek()?;
        self.at += 1;
        if kind == b'N' {
            self.expect(b';', "`;` after `N`")?;
            return Ok(PhpValue::Null);
        }
        match kind {
            b'r' | b'R' => {
                return Err(PhpError::Refused {
                    kind: kind as char,
                    what: "a reference",
                    at,
                })
            }
            b'C' => {
                return Err(PhpError::Refused {
                    kind: 'C',
                    what: "custom serialization",
                    at,
                })
            }
            b'E' => {
                return Err(PhpError::Refused {
                    kind: 'E',
                    what: "an enum case",
                    at,
                })
            }
            _ => {}
        }
        self.expect(b':', "`:` after the type letter")?;
        match kind {
            b'b' => match self.until(b';')? {
                b"0" => Ok(PhpValue::Bool(false)),
                b"1" => Ok(PhpValue::Bool(true)),
                _ => Err(PhpError::BadNumber { at: at + 2 }),
            },
            b'i' => Ok(PhpValue::Int(self.integer(b';')?)),
            b'd' => {
                let start = self.at;
                let text = self.until(b';')?;
                parse_float(text)
                    .map(PhpValue::Float)
                    .ok_or(PhpError::BadNumber { at: start })
            }
            b's' => Ok(PhpValue::String(self.quoted(b';')?)),
            b'a' => {
                let depth = self.deeper(depth)?;
                let count = self.count(b':')?;
                self.expect(b'{', "`{`")?;
                let mut entries = Vec::with_capacity(count.min(1024));
                for _ in 0..count {
                    let key = self.key()?;
                    entries.push((key, self.value(depth)?));
                }
                self.expect(b'}', "`}` after the array's last entry")?;
                Ok(PhpValue::Array(entries))
            }
            b'O' => {
                let depth = self.deeper(depth)?;
                let class = self.quoted(b':')?;
                let count = self.count(b':')?;
                self.expect(b'{', "`{`")?;
                let mut properties = Vec::with_capacity(count.min(64));
                for _ in 0..count {
                    let name = match self.key()? {
                        ArrayKey::String(name) => name,
                        ArrayKey::Int(i) => i.to_string().into_bytes(),
                    };
                    properties.push((Property::from_mangled(&name), self.value(depth)?));
                }
                self.expect(b'}', "`}` after the object's last property")?;
                Ok(PhpValue::Object(PhpObject { class, properties }))
            }
            other => Err(PhpError::Unexpected {
                at,
                found: other as char,
                expected: "a type letter (N, b, i, d, s, a, O)",
            }),
        }
    }

    /// Steps over one value of any kind, the refused ones too, building nothing. Not
    /// recursive, so no depth within the limit can overflow the stack: `open` holds the
    /// entries left in each array or object it is inside.
    fn skip(&mut self) -> Result<(), PhpError> {
        let mut open: Vec<usize> = Vec::new();
        loop {
            self.skip_one(&mut open)?;
            // Closes what has no entries left, then reads the next entry's key.
            loop {
                match open.last_mut() {
                    None => return Ok(()),
                    Some(0) => {
                        open.pop();
                        self.expect(b'}', "`}`")?;
                    }
                    Some(left) => {
                        *left -= 1;
                        self.key()?;
                        break;
                    }
                }
            }
        }
    }

    /// Steps over a scalar, or into an array or object (pushing its count onto `open`).
    fn skip_one(&mut self, open: &mut Vec<usize>) -> Result<(), PhpError> {
        let at = self.at;
        let kind = self.peek()?;
        self.at += 1;
        if kind == b'N' {
            return self.expect(b';', "`;` after `N`");
        }
        self.expect(b':', "`:` after the type letter")?;
        match kind {
            b'b' | b'i' | b'd' | b'r' | b'R' => self.until(b';').map(drop),
            b's' | b'E' => self.quoted(b';').map(drop),
            b'a' | b'O' => {
                self.deeper(open.len())?;
                if kind == b'O' {
                    self.quoted(b':')?;
                }
                let count = self.count(b':')?;
                self.expect(b'{', "`{`")?;
                open.push(count);
                Ok(())
            }
            b'C' => {
                self.quoted(b':')?;
                let len = self.count(b':')?;
                self.expect(b'{', "`{`")?;
                self.at += len;
                self.expect(b'}', "`}`")
            }
            other => Err(PhpError::Unexpected {
                at,
                found: other as char,
                expected: "a type letter",
            }),
        }
    }

    fn deeper(&self, depth: usize) -> Result<usize, PhpError> {
        match depth < self.limits.max_depth {
            true => Ok(depth + 1),
            false => Err(PhpError::TooDeep {
                limit: self.limits.max_depth,
            }),
        }
    }

    /// An array key or property name: `i:<n>;` or `s:<len>:"<bytes>";`.
    fn key(&mut self) -> Result<ArrayKey, PhpError> {
        self.counted()?;
        let at = self.at;
        match self.peek()? {
            b'i' => {
                self.at += 1;
                self.expect(b':', "`:`")?;
                Ok(ArrayKey::Int(self.integer(b';')?))
            }
            b's' => {
                self.at += 1;
                self.expect(b':', "`:`")?;
                let key = self.quoted(b';')?;
                // PHP makes a canonical decimal string key an integer key.
                Ok(match canonical_int(&key) {
                    Some(int) => ArrayKey::Int(int),
                    None => ArrayKey::String(key),
                })
            }
            other => Err(PhpError::Unexpected {
                at,
                found: other as char,
                expected: "an array key (`i:` or `s:`)",
            }),
        }
    }
}

/// PHP's float forms: decimal, exponential (`1.0E+25`, `2.5E-7`), `NAN`, `INF`, `-INF`.
fn parse_float(text: &[u8]) -> Option<f64> {
    match text {
        b"NAN" => return Some(f64::NAN),
        b"INF" => return Some(f64::INFINITY),
        b"-INF" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    // Rust would take `inf`, `nan` and `infinity` too: PHP's digits only.
    let allowed = |b: &u8| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-');
    if text.is_empty() || !text.iter().all(allowed) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn salvage_reads_the_ids_past_what_the_decoder_refuses() {
        let frame = b"O:4:\"Ping\":4:{s:1:\"a\";E:7:\"Foo:Bar\";s:1:\"b\";a:1:{i:0;R:2;}\
                      s:1:\"c\";C:3:\"Foo\":2:{xy}s:8:\"\0Ping\0id\";i:7;}";
        assert!(PhpValue::from_bytes(frame, &DecodeLimits::default()).is_err());
        let salvaged = salvage(frame).unwrap();
        assert_eq!(salvaged.class, b"Ping");
        assert_eq!((salvaged.id, salvaged.request_id), (Some(7), None));
        let answer = b"O:4:\"Pong\":2:{s:1:\"a\";r:1;s:9:\"requestId\";i:-3;}";
        assert_eq!(salvage(answer).unwrap().request_id, Some(-3));
        assert_eq!(salvage(b"i:5;"), None);
    }

    #[test]
    fn salvage_steps_over_any_depth_php_reads_without_recursion() {
        let nested = |depth: usize| {
            let mut value = "a:1:{i:0;".repeat(depth);
            value.push_str("N;");
            value.push_str(&"}".repeat(depth));
            value
        };
        // 4,096 levels with the top object: the id after them is read, or the array is the
        // id (not an int: not read); 4,097 are more than PHP reads.
        for (first, depth, last, id) in [
            ("a", 4095, "id", Some(9)),
            ("id", 4095, "zz", None),
            ("a", 4096, "id", None),
        ] {
            let frame = format!(
                "O:4:\"Ping\":2:{{s:{}:\"{first}\";{}s:2:\"{last}\";i:9;}}",
                first.len(),
                nested(depth)
            );
            let salvaged = salvage(frame.as_bytes()).unwrap();
            assert_eq!(salvaged.id, id, "{first} at depth {depth}");
        }
    }

    proptest! {
        #[test]
        fn salvage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut framed = b"O:1:\"X\":3:{".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = salvage(&framed);
            let _ = salvage(&bytes);
        }
    }
}
