//! sipring binary
fn main() {}
