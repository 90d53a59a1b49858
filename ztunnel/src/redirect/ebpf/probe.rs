//! What the eBPF capture needs from the kernel and the host, checked before anything is loaded,
//! so a missing piece is reported by name with the kernel version that has it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// One missing piece: what, and since when the kernel has it (or how to get it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub feature: String,
    pub since: String,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.feature, self.since)
    }
}

/// Format the missing pieces as one error.
pub fn report(missing: &[Missing]) -> String {
    let list: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
    format!(
        "eBPF capture is not possible here: missing {}",
        list.join("; ")
    )
}

/// The effective capabilities from `/proc/self/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Which of the capabilities the loader and the node agent use are missing from `caps`.
pub fn missing_caps(caps: u64) -> Vec<Missing> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut out = vec![];
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        out.push(Missing {
            feature: "capability CAP_BPF to load programs and maps".into(),
            since: "Linux 5.8; CAP_SYS_ADMIN before".into(),
        });
    }
    if !has(CAP_NET_ADMIN) {
        out.push(Missing {
            feature: "capability CAP_NET_ADMIN to attach cgroup and sk_lookup programs".into(),
            since: "grant it to the ztunnel container".into(),
        });
    }
    if !has(CAP_SYS_ADMIN) {
        out.push(Missing {
            feature: "capability CAP_SYS_ADMIN to enter pod network namespaces and mount bpffs"
                .into(),
            since: "grant it to the ztunnel container".into(),
        });
    }
    out
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type)
}

/// `pod_cgroup` must be a directory of a cgroup v2 hierarchy.
pub fn cgroup2(pod_cgroup: &Path) -> Option<Missing> {
    match fs_magic(pod_cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => None,
        Ok(_) => Some(Missing {
            feature: format!(
                "cgroup v2 at {} (it is not a cgroup2 file system; pass --pod-cgroup)",
                pod_cgroup.display()
            ),
            since: "Linux 4.5".into(),
        }),
        Err(e) => Some(Missing {
            feature: format!("cgroup v2 at {} ({e})", pod_cgroup.display()),
            since: "Linux 4.5".into(),
        }),
    }
}

/// `bpffs` must be a BPF file system; the standard `/sys/fs/bpf` is mounted when it is not yet.
pub fn bpffs(bpffs: &Path) -> Option<Missing> {
    if fs_magic(bpffs).ok() == Some(BPF_FS_MAGIC) {
        return None;
    }
    if bpffs == Path::new("/sys/fs/bpf") && mount_bpffs(bpffs).is_ok() {
        tracing::info!(path = %bpffs.display(), "mounted bpffs");
        return None;
    }
    Some(Missing {
        feature: format!(
            "bpffs at {} to pin maps and links (mount -t bpf bpf {0}, or pass --bpffs)",
            bpffs.display()
        ),
        since: "Linux 4.4".into(),
    })
}

fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Program types, map types and helpers the programs use, each with the kernel that has it.
pub fn kernel() -> Vec<Missing> {
    let mut out = vec![];
    let programs = [
        (
            ProgramType::CgroupSockAddr,
            "cgroup sock_addr programs (connect4/6, bind4/6, getpeername4/6)",
            "Linux 4.17; getpeername 5.8",
        ),
        (ProgramType::SockOps, "sock_ops programs", "Linux 4.13"),
        (ProgramType::SkLookup, "sk_lookup programs", "Linux 5.9"),
    ];
    for (ty, what, since) in programs {
        match is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => out.push(Missing {
                feature: what.into(),
                since: since.into(),
            }),
            Err(e) => out.push(Missing {
                feature: format!("{what} (probe failed: {e})"),
                since: since.into(),
            }),
        }
    }
    let maps = [
        (MapType::SockHash, "SOCKHASH maps", "Linux 4.18"),
        (MapType::LruHash, "LRU hash maps", "Linux 4.10"),
        (MapType::RingBuf, "ring buffers (eBPF logs)", "Linux 5.8"),
    ];
    for (ty, what, since) in maps {
        if !is_map_supported(ty).unwrap_or(false) {
            out.push(Missing {
                feature: what.into(),
                since: since.into(),
            });
        }
    }
    if !out.is_empty() {
        // Helper probes would only repeat that the program types are missing.
        return out;
    }
    let helpers = [
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "helper bpf_get_netns_cookie in cgroup sock_addr programs",
            "Linux 5.7",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "helper bpf_get_socket_cookie in cgroup sock_addr programs",
            "Linux 5.7",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "helper bpf_get_socket_cookie in sock_ops programs",
            "Linux 5.7",
        ),
        (
            ProgramType::SkLookup,
            BpfHelper::BPF_FUNC_sk_assign,
            "helper bpf_sk_assign in sk_lookup programs",
            "Linux 5.9",
        ),
    ];
    for (ty, helper, what, since) in helpers {
        if !is_helper_supported(ty, helper).unwrap_or(false) {
            out.push(Missing {
                feature: what.into(),
                since: since.into(),
            });
        }
    }
    out
}

/// `BPF_PROG_LOAD` and the cgroup sock_addr attach types of DNS capture (`enum bpf_attach_type`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`; the kernel
/// takes a shorter attr as the older layout with the rest zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Whether the kernel accepts a cgroup sock_addr program for `attach_type`: aya's program-type
/// probe only tries connect, and the sendmsg/recvmsg hooks came later (a kernel without them
/// rejects the attach type at load with EINVAL).
fn sock_addr_hook_supported(attach_type: u32) -> bool {
    // r0 = 1 (allow); exit.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    // SAFETY: bpf(2) reads `attr` and the instructions and license it points to, which outlive
    // the call; on success it returns a new descriptor that is closed at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: closing the descriptor bpf(2) just returned.
    unsafe { libc::close(fd as i32) };
    true
}

/// The hooks DNS capture adds (unconnected UDP to port 53 and the replies' source), each with
/// the kernel that has it.
pub fn dns_hooks() -> Vec<Missing> {
    let hooks = [
        (
            BPF_CGROUP_UDP4_SENDMSG,
            "cgroup sock_addr hook sendmsg4 (DNS capture over UDP)",
            "Linux 4.18",
        ),
        (
            BPF_CGROUP_UDP6_SENDMSG,
            "cgroup sock_addr hook sendmsg6 (DNS capture over UDP)",
            "Linux 4.18",
        ),
        (
            BPF_CGROUP_UDP4_RECVMSG,
            "cgroup sock_addr hook recvmsg4 (source of DNS replies)",
            "Linux 5.2",
        ),
        (
            BPF_CGROUP_UDP6_RECVMSG,
            "cgroup sock_addr hook recvmsg6 (source of DNS replies)",
            "Linux 5.2",
        ),
    ];
    hooks
        .into_iter()
        .filter(|(ty, _, _)| !sock_addr_hook_supported(*ty))
        .map(|(_, what, since)| Missing {
            feature: format!("{what}; or run with --dns-capture off"),
            since: since.into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_caps() {
        let status = "Name:\tztunnel\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert!(missing_caps(0x1ff_ffff_ffff).is_empty());
    }

    #[test]
    fn names_missing_caps_with_kernel_version() {
        let caps = 1u64 << CAP_NET_ADMIN;
        let missing = missing_caps(caps);
        let text = report(&missing);
        assert!(text.contains("CAP_BPF"), "{text}");
        assert!(text.contains("Linux 5.8"), "{text}");
        assert!(text.contains("CAP_SYS_ADMIN"), "{text}");
        assert!(!text.contains("CAP_NET_ADMIN"), "{text}");
    }

    #[test]
    fn dns_hooks_probe_loads_a_real_program() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: loading BPF programs needs root");
            return;
        }
        // This kernel (6.x) has every hook; an attach type it does not know is refused.
        assert!(dns_hooks().is_empty(), "{:?}", dns_hooks());
        assert!(!sock_addr_hook_supported(9999));
    }

    #[test]
    fn tmp_is_not_cgroup2_nor_bpffs() {
        let dir = std::env::temp_dir();
        let m = cgroup2(&dir).expect("temp dir is not cgroup2");
        assert!(m.to_string().contains("Linux 4.5"), "{m}");
        let m = bpffs(&dir).expect("temp dir is not bpffs");
        assert!(m.to_string().contains("bpffs"), "{m}");
    }
}
