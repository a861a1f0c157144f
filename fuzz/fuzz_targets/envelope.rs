//! Envelope decoding with each codec (the PHP wire's too): any frame body decodes or fails with a typed error.
//! The body is also split as a stream batch's MessagePack item is, and checked against rmp_serde.
#![no_main]

use channel_dispatcher::Codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for &codec in Codec::all().iter().chain([&Codec::Php]) {
        channel_dispatcher::fuzzing::envelope(codec, data);
    }
    channel_dispatcher::fuzzing::value_len(data);
});
