//! The PHP `serialize()` codec: the frames the PHP library itself produced decode and encode
//! back byte for byte; Rust-built values match them; floats print as PHP prints them; any
//! value round-trips; any bytes end in a value or a typed error, within the limits.

use channel_dispatcher::php::{
    ArrayKey, DecodeLimits, PhpError, PhpObject, PhpValue, Property, Visibility,
};
use proptest::prelude::*;

/// (title, payload) of every recorded frame, its header checked.
fn samples() -> Vec<(String, Vec<u8>)> {
    let text = include_str!("data/php-wire-samples.txt");
    let mut samples = Vec::new();
    let mut title = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("## ") {
            title = Some(t.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let frame: Vec<u8> = (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
                .collect();
            assert_eq!(frame[0], 0, "the frame prefix");
            let len = u32::from_le_bytes(frame[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 5, "the length, little-endian");
            samples.push((title.take().unwrap(), frame[5..].to_vec()));
        }
    }
    samples
}

fn decode(bytes: &[u8]) -> Result<PhpValue, PhpError> {
    PhpValue::from_bytes(bytes, &DecodeLimits::default())
}

fn s(text: &str) -> PhpValue {
    PhpValue::String(text.as_bytes().to_vec())
}

#[test]
fn every_recorded_frame_decodes_and_encodes_back_byte_for_byte() {
    let samples = samples();
    assert_eq!(samples.len(), 13);
    for (title, payload) in samples {
        let value = decode(&payload).unwrap_or_else(|e| panic!("{title}: {e}"));
        assert_eq!(value.to_bytes(), payload, "{title}: {value}");
    }
}

fn sample(title: &str) -> Vec<u8> {
    samples()
        .into_iter()
        .find(|(t, _)| t.starts_with(title))
        .unwrap()
        .1
}

const NS: &str = "Flyokai\\AmpChannelDispatcher\\";

#[test]
fn values_built_in_rust_match_what_php_wrote() {
    let ping = PhpObject::new("PingRequest")
        .with(Property::public("note"), s("hello"))
        .with(Property::private("PingRequest", "id"), PhpValue::Int(0));
    assert_eq!(PhpValue::Object(ping).to_bytes(), sample("PingRequest"));

    let class = format!("{NS}FatalErrorResponse");
    let fatal = PhpObject::new(class.as_bytes())
        .with(
            Property::public("message"),
            s("Cannot find recipient waiting for response with \"requestId: 4242\""),
        )
        .with(Property::public("code"), PhpValue::Int(0))
        .with(Property::public("requestId"), PhpValue::Null)
        .with(Property::private(class.as_bytes(), "id"), PhpValue::Null);
    assert_eq!(
        PhpValue::Object(fatal).to_bytes(),
        sample("FatalErrorResponse (dispatcher")
    );

    // Mixed types, nested arrays, raw bytes: `"x\0y"` and UTF-8 `ü` pass unchanged.
    let payload = PhpValue::Array(vec![
        (ArrayKey::from("a"), PhpValue::Int(1)),
        (
            ArrayKey::from("b"),
            PhpValue::Array(vec![
                (ArrayKey::Int(0), PhpValue::Float(1.5)),
                (ArrayKey::Int(1), PhpValue::Bool(true)),
                (ArrayKey::Int(2), PhpValue::Null),
                (ArrayKey::Int(3), PhpValue::String(b"x\0y".to_vec())),
            ]),
        ),
        (
            ArrayKey::from("c"),
            PhpValue::String("ü".as_bytes().to_vec()),
        ),
    ]);
    let echo = PhpObject::new("EchoRequest")
        .with(Property::public("payload"), payload)
        .with(Property::private("EchoRequest", "id"), PhpValue::Int(3));
    assert_eq!(PhpValue::Object(echo).to_bytes(), sample("EchoRequest"));
    assert_eq!(PhpValue::Null.to_bytes(), sample("null sent"));
}

#[test]
fn the_private_id_is_read_in_every_spelling_php_accepts() {
    let mangled = decode(&sample("PingRequest")).unwrap();
    let PhpValue::Object(object) = mangled else {
        panic!("an object")
    };
    let (property, value) = &object.properties[1];
    assert_eq!(
        property.visibility,
        Visibility::Private(b"PingRequest".to_vec())
    );
    assert_eq!(
        (property.name.as_slice(), value),
        (&b"id"[..], &PhpValue::Int(0))
    );
    for spelling in [&b"id"[..], b"\0*\0id"] {
        let mut bytes = b"O:11:\"PingRequest\":1:{".to_vec();
        PhpValue::String(spelling.to_vec()).write(&mut bytes);
        bytes.extend_from_slice(b"i:7;}");
        let PhpValue::Object(object) = decode(&bytes).unwrap() else {
            panic!("an object")
        };
        assert_eq!(object.get(b"id"), Some(&PhpValue::Int(7)));
    }
}

#[test]
fn floats_print_exactly_as_php_prints_them() {
    let table: &[(f64, &str)] = &[
        // Measured from PHP 8.2 (the project's wire notes).
        (0.1, "0.1"),
        (1.5, "1.5"),
        (1e25, "1.0E+25"),
        (1e-5, "1.0E-5"),
        (-0.0, "-0"),
        (1.0, "1"),
        (2.5e-7, "2.5E-7"),
        (f64::NAN, "NAN"),
        (f64::INFINITY, "INF"),
        (f64::NEG_INFINITY, "-INF"),
        // zend_gcvt's rule: fixed notation while the decimal point is within 17 digits of
        // the first and no more than 3 zeros follow it.
        (0.0, "0"),
        (100.0, "100"),
        (0.0001, "0.0001"),
        (0.00012, "0.00012"),
        (1e16, "10000000000000000"),
        (1e17, "1.0E+17"),
        (123456789012345680.0, "1.2345678901234568E+17"),
        (0.30000000000000004, "0.30000000000000004"),
        (-123.456, "-123.456"),
        (1.5e300, "1.5E+300"),
        (-2.5e-300, "-2.5E-300"),
        (9007199254740993.0, "9007199254740992"),
    ];
    for &(value, php) in table {
        let bytes = PhpValue::Float(value).to_bytes();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            format!("d:{php};"),
            "{value:?}"
        );
        // And it reads back as the same double.
        match decode(&bytes).unwrap() {
            PhpValue::Float(back) if value.is_nan() => assert!(back.is_nan()),
            PhpValue::Float(back) => {
                assert_eq!(back.to_bits(), value.to_bits(), "{php}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn canonical_decimal_string_keys_are_integer_keys() {
    assert_eq!(ArrayKey::from("5"), ArrayKey::Int(5));
    assert_eq!(ArrayKey::from("-5"), ArrayKey::Int(-5));
    for not in ["05", "+5", "-0", "", "5 ", "99999999999999999999"] {
        assert_eq!(
            ArrayKey::from(not),
            ArrayKey::String(not.as_bytes().to_vec())
        );
    }
    let array = PhpValue::Array(vec![(ArrayKey::String(b"7".to_vec()), PhpValue::Null)]);
    assert_eq!(array.to_bytes(), b"a:1:{i:7;N;}");
    assert_eq!(
        decode(b"a:1:{s:1:\"7\";N;}").unwrap(),
        PhpValue::Array(vec![(ArrayKey::Int(7), PhpValue::Null)])
    );
}

#[test]
fn references_custom_serialization_and_enums_are_refused() {
    for (bytes, kind) in [
        (&b"a:2:{i:0;i:1;i:1;R:2;}"[..], 'R'),
        (b"a:2:{i:0;O:8:\"stdClass\":0:{}i:1;r:2;}", 'r'),
        (b"C:11:\"ArrayObject\":21:{x:i:0;a:0:{};m:a:0:{}}", 'C'),
        (b"E:7:\"Foo:Bar\";", 'E'),
    ] {
        match decode(bytes) {
            Err(PhpError::Refused { kind: refused, .. }) => assert_eq!(refused, kind),
            other => panic!("{kind}: {other:?}"),
        }
    }
}

#[test]
fn limits_are_kept_before_anything_is_allocated() {
    let deep = "a:1:{i:0;".repeat(100) + "N;" + &"}".repeat(100);
    assert!(matches!(
        decode(deep.as_bytes()),
        Err(PhpError::TooDeep { limit: 64 })
    ));
    // Counts and lengths larger than the input are refused at once.
    for bomb in [
        &b"a:999999999999:{"[..],
        b"s:999999999999:\"x\";",
        b"a:99999999999999999999:{",
    ] {
        assert!(
            matches!(decode(bomb), Err(PhpError::BadNumber { .. })),
            "{:?}",
            decode(bomb)
        );
    }
    let many = format!("a:3:{{{}}}", "i:0;N;".repeat(3));
    let limits = DecodeLimits {
        max_values: 5,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        PhpValue::from_bytes(many.as_bytes(), &limits),
        Err(PhpError::TooMany { limit: 5 })
    ));
    assert!(matches!(
        decode(b"N;N;"),
        Err(PhpError::Trailing { left: 2 })
    ));
    assert!(matches!(
        decode(b"a:1:{i:0;"),
        Err(PhpError::Truncated { .. })
    ));
    assert!(matches!(
        decode(b"s:5:\"ab"),
        Err(PhpError::BadNumber { .. })
    ));
    assert!(matches!(
        decode(b"i:99999999999999999999;"),
        Err(PhpError::BadNumber { .. })
    ));
    assert!(matches!(decode(b"d:inf;"), Err(PhpError::BadNumber { .. })));
}

#[test]
fn falsy_top_level_values_are_known() {
    for falsy in [
        PhpValue::Null,
        PhpValue::Bool(false),
        PhpValue::Int(0),
        PhpValue::Float(0.0),
        s(""),
        s("0"),
        PhpValue::Array(vec![]),
    ] {
        assert!(falsy.is_falsy(), "{falsy}");
    }
    assert!(!PhpValue::Object(PhpObject::new("X")).is_falsy());
    assert!(!s("00").is_falsy());
}

fn any_value() -> impl Strategy<Value = PhpValue> {
    let bytes = proptest::collection::vec(any::<u8>(), 0..12);
    let leaf = prop_oneof![
        Just(PhpValue::Null),
        any::<bool>().prop_map(PhpValue::Bool),
        any::<i64>().prop_map(PhpValue::Int),
        any::<f64>().prop_map(PhpValue::Float),
        bytes.clone().prop_map(PhpValue::String),
    ];
    leaf.prop_recursive(4, 64, 6, move |inner| {
        let key = prop_oneof![
            any::<i64>().prop_map(ArrayKey::Int),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|k| ArrayKey::from(&k[..])),
        ];
        let visibility = prop_oneof![
            Just(Visibility::Public),
            Just(Visibility::Protected),
            "[A-Za-z\\\\]{1,12}".prop_map(|c| Visibility::Private(c.into_bytes())),
        ];
        prop_oneof![
            proptest::collection::vec((key, inner.clone()), 0..6).prop_map(PhpValue::Array),
            (
                "[A-Za-z][A-Za-z0-9\\\\]{0,20}",
                proptest::collection::vec((visibility, "[a-z]{1,8}", inner), 0..6)
            )
                .prop_map(|(class, properties)| {
                    PhpValue::Object(PhpObject {
                        class: class.into_bytes(),
                        properties: properties
                            .into_iter()
                            .map(|(visibility, name, value)| {
                                (
                                    Property {
                                        visibility,
                                        name: name.into_bytes(),
                                    },
                                    value,
                                )
                            })
                            .collect(),
                    })
                }),
        ]
    })
}

proptest! {
    #[test]
    fn any_value_round_trips(value in any_value()) {
        let bytes = value.to_bytes();
        let back = decode(&bytes).unwrap();
        prop_assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn any_bytes_end_in_a_value_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn any_cut_of_a_value_is_a_typed_error(value in any_value(), cut in any::<prop::sample::Index>()) {
        let bytes = value.to_bytes();
        let cut = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..cut]).is_err());
    }
}

mod mapping {
    use super::*;
    use channel_dispatcher::php::{from_object, from_value, to_message, to_object, to_value};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PingRequest {
        note: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PongResponse {
        reply: String,
        #[serde(rename = "requestId")]
        request_id: Option<i64>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct EchoRequest {
        payload: PhpValue,
    }

    fn object(bytes: &[u8]) -> PhpObject {
        match decode(bytes).unwrap() {
            PhpValue::Object(object) => object,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn a_struct_is_an_object_of_its_class_with_the_private_id_last() {
        let ping = PingRequest {
            note: "hello".into(),
        };
        let object = to_object("PingRequest", &ping, Some(PhpValue::Int(0))).unwrap();
        assert_eq!(PhpValue::Object(object).to_bytes(), sample("PingRequest"));

        let (pong, id): (PongResponse, _) = from_object(object_of("PongResponse")).unwrap();
        assert_eq!(
            pong,
            PongResponse {
                reply: "pong: hello".into(),
                request_id: Some(0)
            }
        );
        assert_eq!(id, Some(PhpValue::Int(0)));
    }

    fn object_of(title: &str) -> PhpObject {
        object(&sample(title))
    }

    #[test]
    fn a_structs_serde_name_is_its_class() {
        #[derive(Serialize)]
        #[serde(rename = "Flyokai\\AmpChannelDispatcher\\ErrorResponse")]
        struct ErrorResponse {
            message: String,
            code: i64,
            #[serde(rename = "requestId")]
            request_id: Option<i64>,
        }
        let error = ErrorResponse {
            message: "No handler for UnknownRequest".into(),
            code: 404,
            request_id: Some(1),
        };
        let object = to_message(&error, Some(PhpValue::Int(1))).unwrap();
        assert_eq!(
            PhpValue::Object(object).to_bytes(),
            sample("ErrorResponse (router")
        );
        let ping = to_message(
            &PingRequest {
                note: "hello".into(),
            },
            Some(PhpValue::Int(0)),
        );
        assert_eq!(
            PhpValue::Object(ping.unwrap()).to_bytes(),
            sample("PingRequest")
        );
        assert!(matches!(
            to_message(&vec![1, 2], None),
            Err(PhpError::Mapping { .. })
        ));
    }

    #[test]
    fn any_php_value_passes_through_a_struct_exactly() {
        let bytes = sample("EchoRequest");
        let (echo, id): (EchoRequest, _) = from_object(object(&bytes)).unwrap();
        // Types, key order and raw bytes survive: encoding it again gives PHP's bytes.
        let again = to_object("EchoRequest", &echo, id).unwrap();
        assert_eq!(PhpValue::Object(again).to_bytes(), bytes);
    }

    #[test]
    fn properties_match_by_name_in_any_order_unknown_ones_ignored() {
        let bytes = b"O:12:\"PongResponse\":4:{s:9:\"requestId\";i:5;s:7:\"\0*\0zzzz\";b:1;s:5:\"\0*\0id\";i:9;s:5:\"reply\";s:2:\"ok\";}";
        let (pong, id): (PongResponse, _) = from_object(object(bytes)).unwrap();
        assert_eq!(pong.reply, "ok");
        assert_eq!(pong.request_id, Some(5));
        assert_eq!(id, Some(PhpValue::Int(9)));
        // A missing field is an error that names it.
        let missing = b"O:12:\"PongResponse\":1:{s:9:\"requestId\";N;}";
        let error = from_object::<PongResponse>(object(missing)).unwrap_err();
        assert!(error.to_string().contains("reply"), "{error}");
    }

    #[test]
    fn rust_types_map_onto_php_values() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum Shape {
            Dot,
            Circle(f64),
            Rect { w: u32, h: u32 },
        }
        let shapes = vec![Shape::Dot, Shape::Circle(1.5), Shape::Rect { w: 2, h: 3 }];
        let value = to_value(&shapes).unwrap();
        assert_eq!(
            value.to_bytes(),
            b"a:3:{i:0;s:3:\"Dot\";i:1;a:1:{s:6:\"Circle\";d:1.5;}i:2;a:1:{s:4:\"Rect\";a:2:{s:1:\"w\";i:2;s:1:\"h\";i:3;}}}"
        );
        assert_eq!(from_value::<Vec<Shape>>(value).unwrap(), shapes);

        let map: std::collections::BTreeMap<String, Option<u8>> =
            [("7".to_owned(), Some(1)), ("x".to_owned(), None)].into();
        let value = to_value(&map).unwrap();
        assert_eq!(value.to_bytes(), b"a:2:{i:7;i:1;s:1:\"x\";N;}");
        assert_eq!(
            from_value::<std::collections::BTreeMap<String, Option<u8>>>(value).unwrap(),
            map
        );
        assert!(matches!(to_value(&u64::MAX), Err(PhpError::Mapping { .. })));
        let bool_keys: std::collections::BTreeMap<bool, u8> = [(true, 1)].into();
        assert!(matches!(
            to_value(&bool_keys),
            Err(PhpError::Mapping { .. })
        ));
        // Bytes that are not UTF-8 reach a byte buffer, not a string.
        let raw: Vec<u8> = from_value::<serde_bytes_like::Buf>(PhpValue::String(vec![0xff, 0]))
            .unwrap()
            .0;
        assert_eq!(raw, [0xff, 0]);
    }

    /// A byte buffer that takes bytes as bytes (what `serde_bytes` does).
    mod serde_bytes_like {
        pub(super) struct Buf(pub(super) Vec<u8>);
        impl<'de> serde::Deserialize<'de> for Buf {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Buf;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Buf, E> {
                        Ok(Buf(v))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }
}

#[test]
fn the_recorded_frames_are_cut_from_one_stream_and_written_back_the_same() {
    use bytes::BytesMut;
    use channel_dispatcher::php::framing::Frames;
    let payloads: Vec<Vec<u8>> = samples().into_iter().map(|(_, p)| p).collect();
    let mut stream = BytesMut::new();
    for payload in &payloads {
        Frames::encode(payload, &mut stream);
    }
    let text = include_str!("data/php-wire-samples.txt");
    let recorded: String = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let written: String = stream.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(written, recorded, "our frames are PHP's, byte for byte");
    let frames = Frames::new(1 << 20);
    let mut cut = Vec::new();
    while let Some(payload) = frames.decode(&mut stream).unwrap() {
        cut.push(payload.to_vec());
    }
    assert_eq!(cut, payloads);
}
