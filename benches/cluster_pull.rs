//! Benchmark placeholder: N nodes pull a new image at once, with and without peers (issue 20).
fn main() {}
