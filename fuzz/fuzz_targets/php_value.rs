//! Any bytes fed to the PHP `serialize()` decoder end in a value or a typed error, within the
//! limits; a value that decodes encodes to bytes that decode to the same bytes again.
#![no_main]

use channel_dispatcher::php::{DecodeLimits, PhpValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let limits = DecodeLimits {
        max_depth: 32,
        max_values: 10_000,
    };
    if let Ok(value) = PhpValue::from_bytes(bytes, &limits) {
        let encoded = value.to_bytes();
        let again = PhpValue::from_bytes(&encoded, &DecodeLimits::default())
            .expect("what we encode decodes");
        assert_eq!(again.to_bytes(), encoded);
    }
});
