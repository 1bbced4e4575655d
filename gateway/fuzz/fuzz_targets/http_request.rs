//! Hostile bytes on one plain-HTTP proxy connection must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ployz_gateway::fuzz::http_request(data);
});
