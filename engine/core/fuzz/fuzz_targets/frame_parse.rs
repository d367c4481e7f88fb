//! Fuzzes the stream entry points: framer, parser, validation, error responses and the
//! shard proxy. Run: `cargo +nightly fuzz run frame_parse -- -max_total_time=60`
//! (from `engine/core`). The corpus is replayed as a test by `tests/fuzz_replay.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));

include!("frame_parse_body.rs");
