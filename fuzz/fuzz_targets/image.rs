#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| so8t::fuzz::image(data));
