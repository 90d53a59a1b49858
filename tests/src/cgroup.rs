//! The cgroup2 hierarchy the test bed mounts in a temp dir, and pod cgroups named the way kubelet's systemd driver names them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Where the cgroup2 hierarchy is mounted. Not under /sys: `ip netns exec` remounts /sys.
pub(crate) const MOUNT_POINT: &str = "/tmp/ztb-cgroup";

/// Serialises mounting, unmounting and the creation and removal of instance directories
/// between test beds, in this process and in others.
const LOCK_FILE: &str = "/tmp/ztb-cgroup.lock";

/// How long to keep retrying `rmdir` while killed processes leave a cgroup.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(3);

/// An exclusive `flock` on [`LOCK_FILE`], released on drop.
pub(crate) struct MountLock(File);

impl MountLock {
    pub(crate) fn acquire() -> anyhow::Result<MountLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("cannot open {LOCK_FILE}"))?;
        loop {
            // SAFETY: flock on a descriptor owned by `file`.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(MountLock(file));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("cannot lock {LOCK_FILE}"));
            }
        }
    }
}

impl Drop for MountLock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor owned by `self.0`; closing it would release it anyway.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Whether `mountinfo` (the text of /proc/self/mountinfo) shows a cgroup2 file system at `point`.
pub(crate) fn mountinfo_has_cgroup2(mountinfo: &str, point: &str) -> bool {
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        left.split(' ').nth(4) == Some(point) && right.split(' ').next() == Some("cgroup2")
    })
}

/// Whether a cgroup2 hierarchy is mounted at `point` in this mount namespace.
pub(crate) fn is_mounted(point: &str) -> anyhow::Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(mountinfo_has_cgroup2(&info, point))
}

/// Mounts cgroup2 at `point` unless it is mounted there already. Call with the [`MountLock`] held.
pub(crate) fn ensure_mounted(point: &str) -> anyhow::Result<()> {
    if is_mounted(point)? {
        return Ok(());
    }
    std::fs::create_dir_all(point).with_context(|| format!("cannot create {point}"))?;
    let target = c_string(Path::new(point))?;
    // SAFETY: all pointers are to NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot mount cgroup2 at {point}"));
    }
    Ok(())
}

/// Unmounts `point` when no test bed directory (`ztb?????`) is left in it; returns whether it did.
/// Call with the [`MountLock`] held.
pub(crate) fn unmount_if_unused(point: &str) -> anyhow::Result<bool> {
    if !is_mounted(point)? || !instance_dirs(Path::new(point))?.is_empty() {
        return Ok(false);
    }
    let target = c_string(Path::new(point))?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("cannot unmount {point}"));
    }
    // The directory is ours and empty once unmounted; leaving it would be harmless.
    let _ = std::fs::remove_dir(point);
    Ok(true)
}

/// Test bed directories (named like an instance prefix) directly under `mount`.
pub(crate) fn instance_dirs(mount: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in
        std::fs::read_dir(mount).with_context(|| format!("cannot list {}", mount.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", mount.display()))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(crate::naming::is_prefix)
        {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// The chain of directories, parent first, that kubelet's systemd cgroup driver creates for a
/// BestEffort pod's container, relative to the cgroup root.
pub(crate) fn besteffort_pod_dirs(pod_uid: &str, container_id: &str) -> [PathBuf; 4] {
    let kubepods = PathBuf::from("kubepods.slice");
    let qos = kubepods.join("kubepods-besteffort.slice");
    let pod = qos.join(format!(
        "kubepods-besteffort-pod{}.slice",
        pod_uid.replace('-', "_")
    ));
    let scope = pod.join(format!("cri-containerd-{container_id}.scope"));
    [kubepods, qos, pod, scope]
}

/// Creates `dir` if missing; returns whether this call created it.
pub(crate) fn create(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot create cgroup {}", dir.display())),
    }
}

/// Opens `dir/cgroup.procs` for writing, so a child can move itself in between fork and exec.
pub(crate) fn open_procs(dir: &Path) -> anyhow::Result<File> {
    let p = dir.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))
}

/// PIDs listed in `dir/cgroup.procs`.
pub(crate) fn procs(dir: &Path) -> anyhow::Result<Vec<u32>> {
    let p = dir.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kills every process in `dir` and below it.
///
/// `cgroup.kill` (Linux 5.14) also catches processes forked while killing; without it, the
/// listed processes of each directory are sent SIGKILL.
pub(crate) fn kill_all(dir: &Path) -> anyhow::Result<()> {
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        return OpenOptions::new()
            .write(true)
            .open(&kill)
            .and_then(|mut f| f.write_all(b"1"))
            .with_context(|| format!("cannot write {}", kill.display()));
    }
    for d in subtree_leaf_first(dir)? {
        for pid in procs(&d)? {
            // SAFETY: plain syscall on a PID; a process gone meanwhile yields ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    Ok(())
}

/// `dir` and every cgroup below it, children before their parents.
pub(crate) fn subtree_leaf_first(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    collect_leaf_first(dir, &mut out)?;
    Ok(out)
}

fn collect_leaf_first(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_leaf_first(&entry.path(), out)?;
        }
    }
    out.push(dir.to_path_buf());
    Ok(())
}

/// Removes the empty cgroup `dir`, retrying while it is busy: killed processes take a moment to
/// leave. A directory already gone counts as removed.
pub(crate) fn remove(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove cgroup {}", dir.display()));
            }
        }
    }
}

fn c_string(p: &Path) -> anyhow::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
90 22 0:38 / /tmp/ztb-cgroup rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw
91 22 0:50 / /tmp/other rw,relatime - tmpfs tmpfs rw
";

    #[test]
    fn finds_cgroup2_mount() {
        assert!(mountinfo_has_cgroup2(MOUNTINFO, "/tmp/ztb-cgroup"));
        assert!(mountinfo_has_cgroup2(MOUNTINFO, "/sys/fs/cgroup/unified"));
        assert!(!mountinfo_has_cgroup2(MOUNTINFO, "/sys/fs/cgroup/systemd"));
        assert!(!mountinfo_has_cgroup2(MOUNTINFO, "/tmp/other"));
        assert!(!mountinfo_has_cgroup2(MOUNTINFO, "/tmp"));
        assert!(!mountinfo_has_cgroup2("", "/tmp/ztb-cgroup"));
    }

    #[test]
    fn kubelet_systemd_names() {
        let dirs = besteffort_pod_dirs("0b5d9f6e-1c2a-4e3b-9a7d-2f4c6e8a0b1c", "ab12");
        assert_eq!(dirs[0], Path::new("kubepods.slice"));
        assert_eq!(
            dirs[1],
            Path::new("kubepods.slice/kubepods-besteffort.slice")
        );
        assert_eq!(
            dirs[2],
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0b5d9f6e_1c2a_4e3b_9a7d_2f4c6e8a0b1c.slice"
            )
        );
        assert_eq!(
            dirs[3],
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0b5d9f6e_1c2a_4e3b_9a7d_2f4c6e8a0b1c.slice/\
                 cri-containerd-ab12.scope"
            )
        );
    }

    #[test]
    fn leaf_first_order() {
        let tmp = std::env::temp_dir().join(format!("ztb-test-{}", fastrand::u64(..)));
        std::fs::create_dir_all(tmp.join("a/b")).unwrap();
        std::fs::create_dir_all(tmp.join("c")).unwrap();
        let order = subtree_leaf_first(&tmp).unwrap();
        let pos = |p: &Path| order.iter().position(|x| x == p).unwrap();
        assert_eq!(order.len(), 4);
        assert!(pos(&tmp.join("a/b")) < pos(&tmp.join("a")));
        assert_eq!(order.last().unwrap(), &tmp);
        for d in &order {
            std::fs::remove_dir(d).unwrap();
        }
    }
}
