//! Translation golden tests: the example folder under deploy/examples/ against checked-in renderings
//! (the workload API, and each waypoint's Envoy resources).
//! `UPDATE_GOLDEN=1 cargo test -p pilot --test golden` rewrites the expected files after a deliberate change.

use std::path::Path;

use pilot::translate::{MeshOptions, render, translate};

fn compare(name: &str, actual: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let golden = root.join(format!("pilot/tests/golden/{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    if expected != actual {
        let out = golden.with_extension("actual.txt");
        std::fs::write(&out, actual).unwrap();
        panic!(
            "translation of {name} differs from {}; see {} (UPDATE_GOLDEN=1 to accept)",
            golden.display(),
            out.display()
        );
    }
}

fn load(example: &str) -> pilot::model::Snapshot {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    pilot::folder::load(&root.join("deploy/examples").join(example))
}

fn check(example: &str) {
    let snap = load(example);
    let t = translate(&snap, &MeshOptions::default());
    let mut actual = String::new();
    for p in snap.problems.iter().chain(t.problems.iter()) {
        actual.push_str(&format!("# problem: {p}\n"));
    }
    actual.push_str(&render(&t.resources));
    compare(example, &actual);
}

#[test]
fn bookinfo() {
    check("bookinfo");
}

#[test]
fn bookinfo_waypoint() {
    let snap = load("bookinfo");
    let t = pilot::waypoint::translate(&snap, &MeshOptions::default());
    let mut actual = String::new();
    for p in &t.problems {
        actual.push_str(&format!("# problem: {p}\n"));
    }
    assert!(t.waypoints.contains_key("bookinfo/waypoint"));
    actual.push_str(&pilot::waypoint::render(&t.waypoints));
    compare("bookinfo-waypoint", &actual);
}
