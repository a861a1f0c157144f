//! PHP values and their `serialize()` form: [`PhpValue`], written byte for byte as PHP 8
//! writes it and read back within [`DecodeLimits`].

use std::fmt;

/// A PHP value, as `serialize()` carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum PhpValue {
    /// `N;`
    Null,
    /// `b:0;` / `b:1;`
    Bool(bool),
    /// `i:<decimal>;`
    Int(i64),
    /// `d:<PHP's float form>;`: shortest round-trip digits, `1.0E+25`, `-0`, `NAN`, `INF`.
    Float(f64),
    /// `s:<length>:"<bytes>";`: PHP strings are bytes, not necessarily UTF-8.
    String(Vec<u8>),
    /// `a:<count>:{<key><value>...}`: an ordered map whose keys are integers or strings.
    Array(Vec<(ArrayKey, PhpValue)>),
    /// `O:<length>:"<class>":<count>:{<name><value>...}`.
    Object(PhpObject),
}

/// The key of a PHP array entry. A string that is a canonical decimal integer (`"5"`, not
/// `"05"` or `"+5"`) is an integer key in PHP: [`ArrayKey::from`] makes it one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ArrayKey {
    /// `i:<decimal>;`
    Int(i64),
    /// `s:<length>:"<bytes>";`
    String(Vec<u8>),
}

impl From<i64> for ArrayKey {
    fn from(key: i64) -> Self {
        Self::Int(key)
    }
}

impl From<&[u8]> for ArrayKey {
    fn from(key: &[u8]) -> Self {
        match canonical_int(key) {
            Some(int) => Self::Int(int),
            None => Self::String(key.to_vec()),
        }
    }
}

impl From<&str> for ArrayKey {
    fn from(key: &str) -> Self {
        Self::from(key.as_bytes())
    }
}

/// `Some` for the decimal form PHP turns into an integer key: no sign but `-`, no leading
/// zero (but `0` itself), no `-0`, within `i64`.
pub(crate) fn canonical_int(key: &[u8]) -> Option<i64> {
    let digits = key.strip_prefix(b"-").unwrap_or(key);
    let canonical = match digits {
        [] => false,
        [b'0'] => digits.len() == key.len(),
        [first, ..] => *first != b'0' && digits.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(key).ok()?.parse().ok()
}

/// An object: its class and its properties, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct PhpObject {
    /// The fully qualified class name, without a leading `\` (`Flyokai\...\ErrorResponse`).
    pub class: Vec<u8>,
    /// The properties, in the order they are written.
    pub properties: Vec<(Property, PhpValue)>,
}

impl PhpObject {
    /// An object of `class` with no properties yet.
    pub fn new(class: impl Into<Vec<u8>>) -> Self {
        Self {
            class: class.into(),
            properties: Vec::new(),
        }
    }

    /// Adds a property.
    pub fn with(mut self, property: Property, value: PhpValue) -> Self {
        self.properties.push((property, value));
        self
    }

    /// The value of the property `name`, whatever its visibility.
    pub fn get(&self, name: &[u8]) -> Option<&PhpValue> {
        self.properties
            .iter()
            .find(|(property, _)| property.name == name)
            .map(|(_, value)| value)
    }
}

/// A property's name and visibility, which `serialize()` writes mangled into the name:
/// `name`, `\0*\0name` (protected), `\0Class\0name` (private to `Class`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Property {
    /// Who may see it.
    pub visibility: Visibility,
    /// Its name.
    pub name: Vec<u8>,
}

impl Property {
    /// A public property.
    pub fn public(name: impl Into<Vec<u8>>) -> Self {
        Self {
            visibility: Visibility::Public,
            name: name.into(),
        }
    }

    /// A property private to `class`.
    pub fn private(class: impl Into<Vec<u8>>, name: impl Into<Vec<u8>>) -> Self {
        Self {
            visibility: Visibility::Private(class.into()),
            name: name.into(),
        }
    }

    /// A protected property.
    pub fn protected(name: impl Into<Vec<u8>>) -> Self {
        Self {
            visibility: Visibility::Protected,
            name: name.into(),
        }
    }

    /// The name as `serialize()` writes it.
    pub fn mangled(&self) -> Vec<u8> {
        match &self.visibility {
            Visibility::Public => self.name.clone(),
            Visibility::Protected => [b"\0*\0", &self.name[..]].concat(),
            Visibility::Private(class) => [b"\0", &class[..], b"\0", &self.name[..]].concat(),
        }
    }

    /// The property a mangled name stands for (a malformed mangling is a public name, as
    /// PHP reads it).
    pub fn from_mangled(mangled: &[u8]) -> Self {
        if let Some(rest) = mangled.strip_prefix(b"\0") {
            if let Some(split) = rest.iter().position(|&b| b == 0) {
                let (owner, name) = (&rest[..split], &rest[split + 1..]);
                return match owner {
                    b"*" => Self::protected(name),
                    _ => Self::private(owner, name),
                };
            }
        }
        Self::public(mangled)
    }
}

/// Who may see a property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// Anyone.
    Public,
    /// The class and its subclasses.
    Protected,
    /// The class that declares it, named here.
    Private(Vec<u8>),
}

impl PhpValue {
    /// The value as `serialize()` writes it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    /// Appends the value as `serialize()` writes it.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Null => out.extend_from_slice(b"N;"),
            Self::Bool(b) => out.extend_from_slice(if *b { b"b:1;" } else { b"b:0;" }),
            Self::Int(i) => {
                out.extend_from_slice(b"i:");
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b';');
            }
            Self::Float(f) => {
                out.extend_from_slice(b"d:");
                write_float(*f, out);
                out.push(b';');
            }
            Self::String(s) => write_string(s, out),
            Self::Array(entries) => {
                out.extend_from_slice(format!("a:{}:{{", entries.len()).as_bytes());
                for (key, value) in entries {
                    match key {
                        ArrayKey::Int(i) => PhpValue::Int(*i).write(out),
                        ArrayKey::String(s) => match canonical_int(s) {
                            // PHP itself would have made it an integer key.
                            Some(i) => PhpValue::Int(i).write(out),
                            None => write_string(s, out),
                        },
                    }
                    value.write(out);
                }
                out.push(b'}');
            }
            Self::Object(object) => {
                out.extend_from_slice(format!("O:{}:\"", object.class.len()).as_bytes());
                out.extend_from_slice(&object.class);
                out.extend_from_slice(format!("\":{}:{{", object.properties.len()).as_bytes());
                for (property, value) in &object.properties {
                    write_string(&property.mangled(), out);
                    value.write(out);
                }
                out.push(b'}');
            }
        }
    }

    /// `true` for the values PHP's read loop takes for the end of input at the top level
    /// (`null`, `false`, `0`, `0.0`, `""`, `"0"`, `[]`): never send one as a message.
    pub fn is_falsy(&self) -> bool {
        match self {
            Self::Null => true,
            Self::Bool(b) => !b,
            Self::Int(i) => *i == 0,
            Self::Float(f) => *f == 0.0,
            Self::String(s) => s.is_empty() || s == b"0",
            Self::Array(entries) => entries.is_empty(),
            Self::Object(_) => false,
        }
    }
}

fn write_string(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("s:{}:\"", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\";");
}

/// A float as PHP 8 prints it with `serialize_precision = -1` (`zend_gcvt` on the shortest
/// round-trip digits, 17 digits at most before the exponential form): `1`, `-0`, `0.1`,
/// `0.0001`, `1.0E-5`, `1.0E+25`, `2.5E-7`, `NAN`, `INF`, `-INF`.
pub(crate) fn write_float(value: f64, out: &mut Vec<u8>) {
    if value.is_nan() {
        return out.extend_from_slice(b"NAN");
    }
    if value.is_infinite() {
        return out.extend_from_slice(if value > 0.0 { b"INF" } else { b"-INF" });
    }
    if value.is_sign_negative() {
        out.push(b'-');
    }
    // Rust's `{:e}` gives the shortest digits that read back as the same double, as PHP's
    // dtoa in mode 0 does: `d[.ddd]e<exp>`.
    let scientific = format!("{:e}", value.abs());
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("`{:e}` always has an exponent");
    let digits: Vec<u8> = mantissa.bytes().filter(|&b| b != b'.').collect();
    let exponent: i32 = exponent.parse().expect("`{:e}` writes a decimal exponent");
    // dtoa's `decpt`: the value is 0.<digits> x 10^decpt.
    let decpt = exponent + 1;
    if !(-3..=17).contains(&decpt) {
        out.push(digits[0]);
        out.push(b'.');
        match &digits[1..] {
            [] => out.push(b'0'),
            rest => out.extend_from_slice(rest),
        }
        out.push(b'E');
        let shown = decpt - 1;
        out.push(if shown < 0 { b'-' } else { b'+' });
        out.extend_from_slice(shown.unsigned_abs().to_string().as_bytes());
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat(b'0').take(decpt.unsigned_abs() as usize));
        out.extend_from_slice(&digits);
    } else {
        let whole = decpt as usize;
        for i in 0..whole {
            out.push(digits.get(i).copied().unwrap_or(b'0'));
        }
        if digits.len() > whole {
            out.push(b'.');
            out.extend_from_slice(&digits[whole..]);
        }
    }
}

impl fmt::Display for PhpValue {
    /// The `serialize()` form, with bytes that are not printable ASCII escaped (`\0`, `\xc3`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.to_bytes() {
            match byte {
                0 => f.write_str("\\0")?,
                0x20..=0x7e => write!(f, "{}", byte as char)?,
                other => write!(f, "\\x{other:02x}")?,
            }
        }
        Ok(())
    }
}
