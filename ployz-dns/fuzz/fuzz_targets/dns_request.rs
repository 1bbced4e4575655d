//! Fuzzes the request handler the DNS server runs on every packet:
//! `cargo +nightly fuzz run dns_request` from `ployz-dns/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ployz_dns::fuzz::dns_request(data);
});
