//! A running connection fed arbitrary peer frames after a valid handshake: it must end once
//! the peer closes, without a panic, within libFuzzer's memory limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    channel_dispatcher::fuzzing::connection_from_bytes(data);
});
