//! Removing what test beds left behind when their process died before teardown (`cargo xtask clean-testbed`).

use std::path::Path;

use crate::{cgroup, naming, netns};

/// Kills the processes in, and deletes, every network namespace named `ztb?????-*`; removes
/// every cgroup named `ztb?????` under the test bed mount; unmounts it if nothing else uses it.
///
/// Also removes the namespaces and cgroups of test beds that are still running, so do not run
/// it alongside tests. Returns a human-readable summary; fails only if nothing could be
/// inspected, otherwise individual failures are listed in the error.
pub fn clean_leftovers() -> anyhow::Result<String> {
    clean(None)
}

/// [`clean_leftovers`] for the one test bed whose prefix is `prefix` (what `cargo xtask down`
/// removes when the demo that owned it is gone): other test beds on the machine are left alone.
pub fn clean_testbed(prefix: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        naming::is_prefix(prefix),
        "{prefix:?} is not a test bed prefix (ztb and five hex digits)"
    );
    clean(Some(prefix))
}

/// Everything of the test beds whose prefix is `only` (all of them when `None`).
fn clean(only: Option<&str>) -> anyhow::Result<String> {
    crate::Testbed::check_privileges()?;
    // Whether a name (netns, cgroup, pin directory) starting with a test-bed prefix is ours.
    let ours = |name: &str| {
        name.get(..naming::PREFIX_LEN)
            .is_some_and(|p| naming::is_prefix(p) && only.is_none_or(|o| o == p))
    };
    let mut done = Vec::new();
    let mut failed = Vec::new();

    let namespaces: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| naming::is_testbed_netns(n) && ours(n))
        .collect();
    let mut killed = 0;
    for ns in &namespaces {
        match netns::kill_processes_in(ns) {
            Ok(pids) => killed += pids.len(),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }

    let lock = cgroup::MountLock::acquire()?;
    let was_mounted = cgroup::is_mounted(cgroup::MOUNT_POINT)?;
    // The hierarchy outlives the mount: leftovers are only reachable by mounting it again.
    cgroup::ensure_mounted(cgroup::MOUNT_POINT)?;
    let roots: Vec<_> = cgroup::instance_dirs(Path::new(cgroup::MOUNT_POINT))?
        .into_iter()
        .filter(|d| d.file_name().and_then(|n| n.to_str()).is_some_and(ours))
        .collect();
    for root in &roots {
        if let Err(e) = cgroup::kill_all(root) {
            failed.push(format!("{e:#}"));
        }
    }
    if killed > 0 || !roots.is_empty() {
        done.push(format!(
            "killed {killed} process(es) found in test bed namespaces"
        ));
    }

    let mut deleted = Vec::new();
    for ns in &namespaces {
        match netns::delete(ns) {
            Ok(()) => deleted.push(ns.as_str()),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !deleted.is_empty() {
        done.push(format!("deleted network namespaces {}", deleted.join(", ")));
    }

    let mut removed = Vec::new();
    for root in &roots {
        let result = cgroup::subtree_leaf_first(root)
            .and_then(|dirs| dirs.iter().try_for_each(|d| cgroup::remove(d)));
        match result {
            Ok(()) => removed.push(root.display().to_string()),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !removed.is_empty() {
        done.push(format!("removed cgroups {}", removed.join(", ")));
    }

    // ztunnel pins its eBPF maps and links per instance in `<bpffs>/<prefix>-<node>`.
    let mut unpinned = Vec::new();
    if let Ok(entries) = std::fs::read_dir(crate::BPFFS) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if ours(&name) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => unpinned.push(name),
                    Err(err) => failed.push(format!("cannot remove {}: {err}", e.path().display())),
                }
            }
        }
    }
    if !unpinned.is_empty() {
        done.push(format!("removed eBPF pins {}", unpinned.join(", ")));
    }

    match cgroup::unmount_if_unused(cgroup::MOUNT_POINT) {
        Ok(true) if was_mounted => done.push(format!("unmounted {}", cgroup::MOUNT_POINT)),
        Ok(_) => {}
        Err(e) => failed.push(format!("{e:#}")),
    }
    drop(lock);

    if !failed.is_empty() {
        anyhow::bail!(
            "{}could not clean everything:\n  {}",
            done.iter().map(|d| format!("{d}\n")).collect::<String>(),
            failed.join("\n  ")
        );
    }
    if done.is_empty() {
        return Ok("no test bed leftovers found".to_owned());
    }
    Ok(done.join("\n"))
}
