//! `kiln demo` runs end to end (it needs the `hello` binary beside `kiln`,
//! which `cargo test --workspace` builds).
// Test helpers panic on purpose: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod util;

#[test]
fn demo_bakes_rebakes_and_verifies() {
    let kiln = std::path::Path::new(env!("CARGO_BIN_EXE_kiln"));
    let hello = kiln.with_file_name("hello");
    assert!(
        hello.is_file(),
        "build the workspace first: {} is missing",
        hello.display()
    );
    let env = util::Env::new();
    let out = env.cmd().arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("same digest: yes"), "{stdout}");
    assert!(
        stdout.contains("(0 written, 2 reused), 2 files (0 read)"),
        "{stdout}"
    );
    assert!(stdout.contains("(1 written, 1 reused)"), "{stdout}");
    assert!(stdout.contains("0 problems"), "{stdout}");
}
