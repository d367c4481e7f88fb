//! Replays the fuzz corpus of `engine/core/fuzz` (seeds, plus every input the fuzzer found
//! interesting and was committed) through the fuzz target's own checks, so CI re-verifies
//! them without a nightly toolchain. Also feeds every corpus file split at every 97th byte.

mod body {
    #![allow(unreachable_pub, missing_docs)]
    include!("../engine/core/fuzz/fuzz_targets/frame_parse_body.rs");
}

#[test]
fn fuzz_corpus_replays_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/core/fuzz/corpus/frame_parse");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        body::run(&data);
        for cut in (0..data.len()).step_by(97) {
            body::run(&data[..cut]);
        }
        n += 1;
    }
    assert!(n >= 49, "corpus has only {n} inputs");
}
