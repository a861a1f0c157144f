//! The frame decoder: any byte stream is cut into frames within the maximum, or skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small maximum makes the oversized-frame path as likely as the normal one.
    channel_dispatcher::fuzzing::frames(data, 64);
    channel_dispatcher::fuzzing::frames(data, 16 * 1024 * 1024);
});
