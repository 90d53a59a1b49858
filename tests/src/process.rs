//! Starting processes inside a pod's cgroup and network namespace, and killing them later without PID-reuse races.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

/// Where a process is placed before it runs its program.
pub(crate) struct Placement {
    /// `cgroup.procs` of the cgroup to join, opened in the parent.
    pub(crate) cgroup_procs: Option<File>,
    /// The network namespace to enter, opened in the parent.
    pub(crate) netns: File,
}

/// Arranges for `cmd`'s child to join the cgroup, then the network namespace, before `exec`.
///
/// The cgroup comes first so that whoever watches the cgroup never sees the process in the
/// wrong namespace without it also being in the wrong cgroup; both files are opened in the
/// parent so the child only makes syscalls (no allocation is allowed after `fork`).
pub(crate) fn place(cmd: &mut std::process::Command, placement: Placement) {
    let Placement {
        cgroup_procs,
        netns,
    } = placement;
    let hook = move || -> io::Result<()> {
        if let Some(mut procs) = cgroup_procs.as_ref() {
            // "0" means the writing process itself.
            procs.write_all(b"0")?;
        }
        crate::netns::enter(netns.as_fd())
    };
    // SAFETY: the hook only calls write(2) and setns(2), both async-signal-safe, on descriptors
    // it owns; it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// A child this test bed must kill at teardown, referred to by pidfd so that a PID reused
/// after the caller reaped the child is never signalled.
pub(crate) struct Tracked {
    pub(crate) pid: u32,
    pidfd: OwnedFd,
}

impl Tracked {
    /// Starts tracking `pid`, which must be an unreaped child of this process.
    ///
    /// Without pidfds (Linux < 5.3) nothing is tracked; teardown's sweeps of the test bed's
    /// cgroups and namespaces still find the process.
    pub(crate) fn new(pid: u32) -> Option<Tracked> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Some(Tracked { pid, pidfd })
    }

    /// Whether the process has exited; a pidfd becomes readable then.
    pub(crate) fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    /// Sends SIGKILL; a process that has already exited is not an error.
    pub(crate) fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on a descriptor we own, no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
        Ok(())
    }
}
