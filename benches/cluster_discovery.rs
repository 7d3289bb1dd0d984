//! Benchmark placeholder: discovery at scale (issue 20).
fn main() {}
