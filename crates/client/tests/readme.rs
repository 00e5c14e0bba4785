//! The README's Rust example is `examples/resize.rs`, which `cargo test` compiles: the two
//! must not drift apart.

#[test]
fn the_readme_example_is_the_compiled_one() {
    let readme = include_str!("../../../README.md");
    let marker = "as in `crates/client/examples/resize.rs`:\n\n```rust\n";
    let start = readme.find(marker).expect("the README introduces the example") + marker.len();
    let end = start + readme[start..].find("```\n").expect("the code block ends");
    let example = include_str!("../examples/resize.rs");
    let code: String =
        example.lines().skip_while(|l| l.starts_with("//!") || l.is_empty()).map(|l| format!("{l}\n")).collect();
    assert_eq!(&readme[start..end], code, "README.md and crates/client/examples/resize.rs differ");
}
