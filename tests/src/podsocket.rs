//! Sockets that belong to a pod as if its application had made them: created by a short-lived
//! child that joined the pod's cgroup and network namespace, handed back over SCM_RIGHTS.
//!
//! A socket records the cgroup of the process that created it, and cgroup eBPF programs
//! (`connect4`, `bind4`, …) act on that cgroup; switching only the thread's netns, as
//! [`crate::Testbed::in_pod`] does, would leave the socket outside the pod's cgroup.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Creates a TCP socket (UDP when `udp`; `AF_INET6` when `v6`) inside the cgroup behind
/// `cgroup_procs` and the network namespace `netns`, optionally bound to `port` on the wildcard
/// address first.
pub(crate) fn create(
    cgroup_procs: &File,
    netns: &File,
    v6: bool,
    udp: bool,
    bind_port: Option<u16>,
) -> io::Result<OwnedFd> {
    let mut pair = [0; 2];
    // SAFETY: socketpair writes two descriptors into `pair`.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, pair.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (parent, child) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let kind = if udp {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM
    };
    // Everything the child needs is prepared before fork: it may only make syscalls.
    let mut addr4: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr4.sin_family = libc::AF_INET as libc::sa_family_t;
    addr4.sin_port = bind_port.unwrap_or(0).to_be();
    let mut addr6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr6.sin6_port = bind_port.unwrap_or(0).to_be();
    let (procs_fd, netns_fd, child_fd) = (
        cgroup_procs.as_raw_fd(),
        netns.as_raw_fd(),
        child.as_raw_fd(),
    );

    // SAFETY: fork in a multi-threaded process; the child only calls async-signal-safe syscalls
    // (write, setns, socket, bind, sendmsg, _exit) on prepared memory and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            child_main(
                procs_fd,
                netns_fd,
                child_fd,
                (family, kind),
                bind_port,
                &addr4,
                &addr6,
            )
        }
    }
    drop(child);
    let received = receive_fd(parent.as_raw_fd());
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match received {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) => {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            };
            Err(io::Error::from_raw_os_error(if code > 0 {
                code
            } else {
                libc::EIO
            }))
        }
        Err(e) => Err(e),
    }
}

/// The child: join the cgroup, then the netns, make the socket, send it, exit with 0 or errno.
unsafe fn child_main(
    procs: RawFd,
    netns: RawFd,
    chan: RawFd,
    (family, kind): (i32, i32),
    bind_port: Option<u16>,
    addr4: &libc::sockaddr_in,
    addr6: &libc::sockaddr_in6,
) -> ! {
    unsafe {
        let fail = || libc::_exit(*libc::__errno_location());
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            fail();
        }
        if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
            fail();
        }
        let s = libc::socket(family, kind | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            fail();
        }
        if bind_port.is_some() {
            let rc = if family == libc::AF_INET6 {
                libc::bind(
                    s,
                    (addr6 as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            } else {
                libc::bind(
                    s,
                    (addr4 as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if rc != 0 {
                fail();
            }
        }
        let mut byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let mut cmsg_buf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), s);
        if libc::sendmsg(chan, &msg, 0) < 0 {
            fail();
        }
        libc::_exit(0)
    }
}

fn receive_fd(chan: RawFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = 0u8;
    let mut iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: receiving into the buffers just described.
    let n = unsafe { libc::recvmsg(chan, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: walking the control messages the kernel wrote.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Ok(None);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(Some(OwnedFd::from_raw_fd(fd)))
    }
}
