//! Translation golden test: the example folder under deploy/examples/ against a checked-in rendering.
//! `UPDATE_GOLDEN=1 cargo test -p pilot --test golden` rewrites the expected file after a deliberate change.

use std::path::Path;

use pilot::translate::{MeshOptions, render, translate};

fn check(example: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let snap = pilot::folder::load(&root.join("deploy/examples").join(example));
    let t = translate(&snap, &MeshOptions::default());
    let mut actual = String::new();
    for p in snap.problems.iter().chain(t.problems.iter()) {
        actual.push_str(&format!("# problem: {p}\n"));
    }
    actual.push_str(&render(&t.resources));
    let golden = root.join(format!("pilot/tests/golden/{example}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    if expected != actual {
        let out = golden.with_extension("actual.txt");
        std::fs::write(&out, &actual).unwrap();
        panic!(
            "translation of {example} differs from {}; see {} (UPDATE_GOLDEN=1 to accept)",
            golden.display(),
            out.display()
        );
    }
}

#[test]
fn bookinfo() {
    check("bookinfo");
}
