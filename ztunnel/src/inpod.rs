//! Finding a pod's network namespace from its cgroup, as kubelet lays them out: the pod UID in a
//! cgroup directory name → a PID listed in that cgroup (or a child) → `/proc/<pid>/ns/net`.
//! No CNI plugin is involved.

use std::io;
use std::path::{Path, PathBuf};

/// How deep to search below the cgroup root (`kubepods.slice/kubepods-besteffort.slice/<pod>/<container>`).
const MAX_DEPTH: usize = 6;

/// The names kubelet gives a pod's cgroup: `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with _>.slice` (systemd driver).
pub fn is_pod_cgroup(dir_name: &str, uid: &str) -> bool {
    let systemd_uid = uid.replace('-', "_");
    dir_name == format!("pod{uid}")
        || (dir_name.ends_with(&format!("pod{systemd_uid}.slice"))
            && dir_name.starts_with("kubepods"))
}

/// The cgroup directory of the pod with `uid`, if any.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> io::Result<Option<PathBuf>> {
    fn walk(dir: &Path, uid: &str, depth: usize) -> io::Result<Option<PathBuf>> {
        if depth > MAX_DEPTH {
            return Ok(None);
        }
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name();
            if is_pod_cgroup(&name.to_string_lossy(), uid) {
                return Ok(Some(entry.path()));
            }
            if let Some(found) = walk(&entry.path(), uid, depth + 1)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
    walk(root, uid, 0)
}

/// Some process in the cgroup or its descendants (the pod's containers live in child cgroups).
pub fn find_pid(cgroup: &Path) -> io::Result<Option<u32>> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Ok(Some(pid));
    }
    for entry in std::fs::read_dir(cgroup)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(pid) = find_pid(&entry.path())?
        {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// Path of the network namespace of the pod with `uid`, or a message saying what is missing.
pub fn find_netns(cgroup_root: &Path, uid: &str) -> Result<PathBuf, String> {
    let cgroup = find_pod_cgroup(cgroup_root, uid)
        .map_err(|e| format!("searching {}: {e}", cgroup_root.display()))?
        .ok_or_else(|| format!("no cgroup for pod {uid} under {}", cgroup_root.display()))?;
    let pid = find_pid(&cgroup)
        .map_err(|e| format!("reading {}: {e}", cgroup.display()))?
        .ok_or_else(|| format!("no process in {}", cgroup.display()))?;
    Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_names() {
        let uid = "3f1c8e2a-9b7d-4c1e-8f00-0123456789ab";
        assert!(is_pod_cgroup(&format!("pod{uid}"), uid));
        assert!(is_pod_cgroup(
            "kubepods-besteffort-pod3f1c8e2a_9b7d_4c1e_8f00_0123456789ab.slice",
            uid
        ));
        assert!(is_pod_cgroup(
            "kubepods-pod3f1c8e2a_9b7d_4c1e_8f00_0123456789ab.slice",
            uid
        ));
        assert!(!is_pod_cgroup("kubepods-besteffort.slice", uid));
        assert!(!is_pod_cgroup(
            "kubepods-besteffort-pod3f1c8e2a_9b7d_4c1e_8f00_0123456789ac.slice",
            uid
        ));
    }

    #[test]
    fn finds_pid_in_child_cgroup() {
        let root = std::env::temp_dir().join(format!("inpod-test-{}", std::process::id()));
        let uid = "aaaa-bbbb";
        let scope = root
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaaaa_bbbb.slice/cri-containerd-1.scope");
        std::fs::create_dir_all(&scope).unwrap();
        std::fs::write(scope.join("cgroup.procs"), "4242\n").unwrap();
        assert_eq!(
            find_netns(&root, uid).unwrap(),
            PathBuf::from("/proc/4242/ns/net")
        );
        assert!(
            find_netns(&root, "other")
                .unwrap_err()
                .contains("no cgroup")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
