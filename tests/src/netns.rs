//! Named network namespaces (`ip netns`): creating, entering from a thread, emptying and deleting them.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::command::{ip, run};

/// Where `ip netns` keeps the bind mounts that name namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Path of the bind mount that names network namespace `name`.
pub(crate) fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates network namespace `name` with its loopback up.
pub(crate) fn add(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Removes the name of namespace `name`; the namespace itself goes once nothing holds it.
pub(crate) fn delete(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "delete", name]).map(drop)
}

/// Sets sysctls inside namespace `name` (one `sysctl` run), leaving the host's values alone.
pub(crate) fn sysctl(name: &str, settings: &[(&str, &str)]) -> anyhow::Result<()> {
    let settings: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec!["netns", "exec", name, "sysctl", "-q", "-w"];
    args.extend(settings.iter().map(String::as_str));
    run("ip", &args).map(drop)
}

/// Opens namespace `name` for `setns`.
pub(crate) fn open(name: &str) -> anyhow::Result<File> {
    let p = path(name);
    File::open(&p).with_context(|| format!("cannot open network namespace {}", p.display()))
}

/// Moves the calling thread into the network namespace behind `fd`.
///
/// Only a raw syscall, so it may run between `fork` and `exec`.
pub(crate) fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor, which `fd` keeps open.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `name` and returns its result.
///
/// A dedicated thread keeps the caller's own namespace untouched; sockets created by `f` stay in
/// `name` wherever they are used afterwards. A panic in `f` is passed on to the caller.
pub(crate) fn run_in<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    let ns = open(name)?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, move || -> io::Result<R> {
                enter(ns.as_fd())?;
                drop(ns);
                Ok(f())
            })
            .context("cannot start a thread")?;
        match handle.join() {
            Ok(result) => result.with_context(|| format!("cannot enter network namespace {name}")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Names of all namespaces in [`NETNS_DIR`].
pub(crate) fn list() -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {NETNS_DIR}"))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Sends SIGKILL to every process whose network namespace is `name`, and returns their PIDs.
///
/// `ip netns delete` only drops the name: processes would keep the namespace (and its links)
/// alive, so they are killed first. This process is never a target even if it is inside.
pub(crate) fn kill_processes_in(name: &str) -> anyhow::Result<Vec<u32>> {
    let target = std::fs::metadata(path(name))
        .with_context(|| format!("cannot stat {}", path(name).display()))?;
    let me = std::process::id();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes exit while we look; those are simply skipped.
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if ns.dev() == target.dev() && ns.ino() == target.ino() {
            // SAFETY: plain syscall on a PID; a process gone meanwhile yields ESRCH.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
    }
    Ok(killed)
}
