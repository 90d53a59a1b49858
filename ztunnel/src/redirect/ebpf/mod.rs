//! eBPF capture: loads the programs of `ebpf/redirect` once per node, attaches the cgroup ones
//! to the pods' parent cgroup, one `sk_lookup` link per enrolled pod netns, and pins maps and
//! links in bpffs so a restart keeps capture in place (connections meanwhile are refused).

pub mod probe;

use std::collections::{HashMap as StdHashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::EbpfLoader;
use aya::maps::{Array, HashMap, MapData, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use redirect_common::{
    AF_INET, AF_INET6, CONFIG_DNS_CAPTURE, CONFIG_LOG_LEVEL, IpKey, LogLevel, OrigDst, PodInfo,
    PortKey, uid_hash,
};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{EbpfSettings, PodCapture, PodTarget, Redirector};

/// The object built by `cargo xtask build-ebpf`, when it existed when ztunnel was built.
#[cfg(ebpf_object)]
static EMBEDDED: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!(
    "ZTUNNEL_EBPF_OBJECT_PATH"
)));
#[cfg(not(ebpf_object))]
static EMBEDDED: Option<&[u8]> = None;

/// The cgroup programs, by name in the object; attached to the pods' parent cgroup.
const SOCK_ADDR_PROGRAMS: &[&str] = &[
    "ztunnel_connect4",
    "ztunnel_connect6",
    "ztunnel_getpeername4",
    "ztunnel_getpeername6",
    "ztunnel_bind4",
    "ztunnel_bind6",
];
/// The cgroup programs of DNS capture, attached only while it is on (`--dns-capture on`).
const DNS_PROGRAMS: &[&str] = &[
    "ztunnel_sendmsg4",
    "ztunnel_sendmsg6",
    "ztunnel_recvmsg4",
    "ztunnel_recvmsg6",
];
const SOCK_OPS_PROGRAM: &str = "ztunnel_sock_ops";
const SK_LOOKUP_PROGRAM: &str = "ztunnel_sk_lookup";
/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The loaded programs and the maps ztunnel reads and writes.
pub struct Ebpf {
    inner: Arc<Inner>,
}

struct Inner {
    bpf: Mutex<aya::Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, PodInfo>>,
    inbound: Mutex<SockHash<MapData, IpKey>>,
    orig_by_port: Mutex<HashMap<MapData, PortKey, OrigDst>>,
    config: Mutex<Array<MapData, u32>>,
    pods_dir: PathBuf,
    /// Netns cookie of each pod enrolled by this process, by uid.
    cookies: Mutex<StdHashMap<String, u64>>,
    /// The symlink naming the instance that owns the pinned state (see [`Owner`]).
    owner: Owner,
}

impl Ebpf {
    /// Probe, load, attach the cgroup programs and take over any pinned state.
    pub fn start(settings: &EbpfSettings) -> Result<Ebpf, String> {
        let pod_cgroup = match &settings.pod_cgroup {
            Some(p) => p.clone(),
            None => detect_pod_cgroup(&settings.cgroup_root)?,
        };
        let mut missing = vec![];
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        missing.extend(probe::missing_caps(
            probe::effective_caps(&status).unwrap_or(0),
        ));
        missing.extend(probe::cgroup2(&pod_cgroup));
        missing.extend(probe::bpffs(&settings.bpffs));
        if missing.is_empty() {
            missing.extend(probe::kernel());
        }
        if missing.is_empty() && settings.dns_capture {
            missing.extend(probe::dns_hooks());
        }
        if !missing.is_empty() {
            return Err(probe::report(&missing));
        }
        let object = match &settings.object {
            Some(path) => std::fs::read(path)
                .map_err(|e| format!("reading the eBPF object {}: {e}", path.display()))?,
            None => EMBEDDED
                .ok_or(
                    "no eBPF object: this ztunnel was built before `cargo xtask build-ebpf` \
                     had built one; run it (then rebuild ztunnel) or pass --ebpf-object",
                )?
                .to_vec(),
        };
        let pin_dir = settings.bpffs.join(&settings.pin_dir);
        let pods_dir = pin_dir.join("pods");
        std::fs::create_dir_all(&pods_dir)
            .map_err(|e| format!("creating the pin directory {}: {e}", pods_dir.display()))?;
        // From now on a predecessor still running (an upgrade) leaves the sweeping to us.
        let owner = Owner::take(&pin_dir)?;

        // aya wants the object 4-byte aligned.
        let aligned: Vec<u32> = object
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_ne_bytes(w)
            })
            .collect();
        // SAFETY: reinterpreting initialized u32s as their bytes, within bounds.
        let bytes =
            unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), object.len()) };
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(bytes)
            .map_err(|e| format!("loading the eBPF object: {e}"))?;
        start_logger(&mut bpf);

        let cgroup = File::open(&pod_cgroup)
            .map_err(|e| format!("opening the pod cgroup {}: {e}", pod_cgroup.display()))?;
        let links_dir = pin_dir.join("cgroup");
        std::fs::create_dir_all(&links_dir)
            .map_err(|e| format!("creating {}: {e}", links_dir.display()))?;
        // The DNS switch is in place before the programs that read it are attached.
        let mut config =
            Array::try_from(take_map(&mut bpf, "CONFIG")?).map_err(|e| e.to_string())?;
        config
            .set(CONFIG_DNS_CAPTURE, u32::from(settings.dns_capture), 0)
            .map_err(|e| format!("setting the DNS capture switch: {e}"))?;
        let dns: &[&str] = if settings.dns_capture {
            DNS_PROGRAMS
        } else {
            for name in DNS_PROGRAMS {
                // Left pinned by a run with DNS capture on: unpinning detaches it.
                let pin = links_dir.join(name);
                if pin.exists() {
                    std::fs::remove_file(&pin)
                        .map_err(|e| format!("unpinning {}: {e}", pin.display()))?;
                }
            }
            &[]
        };
        for name in SOCK_ADDR_PROGRAMS.iter().chain(dns) {
            let prog: &mut CgroupSockAddr = program(&mut bpf, name)?;
            prog.load().map_err(|e| load_error(name, &e))?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| attach_error(name, &pod_cgroup, &e))?;
            let link = FdLink::try_from(prog.take_link(id).map_err(|e| e.to_string())?)
                .map_err(|e| format!("{name}: {e}"))?;
            replace_pin(link, &links_dir.join(name))?;
        }
        {
            let prog: &mut SockOps = program(&mut bpf, SOCK_OPS_PROGRAM)?;
            prog.load().map_err(|e| load_error(SOCK_OPS_PROGRAM, &e))?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| attach_error(SOCK_OPS_PROGRAM, &pod_cgroup, &e))?;
            let link = FdLink::try_from(prog.take_link(id).map_err(|e| e.to_string())?)
                .map_err(|e| format!("{SOCK_OPS_PROGRAM}: {e}"))?;
            replace_pin(link, &links_dir.join(SOCK_OPS_PROGRAM))?;
        }
        {
            let prog: &mut SkLookup = program(&mut bpf, SK_LOOKUP_PROGRAM)?;
            prog.load().map_err(|e| load_error(SK_LOOKUP_PROGRAM, &e))?;
        }
        let enrolled =
            HashMap::try_from(take_map(&mut bpf, "ENROLLED")?).map_err(|e| e.to_string())?;
        let inbound =
            SockHash::try_from(take_map(&mut bpf, "INBOUND")?).map_err(|e| e.to_string())?;
        let orig_by_port =
            HashMap::try_from(take_map(&mut bpf, "ORIG_BY_PORT")?).map_err(|e| e.to_string())?;
        let ebpf = Ebpf {
            inner: Arc::new(Inner {
                bpf: Mutex::new(bpf),
                enrolled: Mutex::new(enrolled),
                inbound: Mutex::new(inbound),
                orig_by_port: Mutex::new(orig_by_port),
                config: Mutex::new(config),
                pods_dir,
                cookies: Mutex::default(),
                owner,
            }),
        };
        ebpf.set_config_log_level(settings.log_level);
        info!(
            pod_cgroup = %pod_cgroup.display(),
            pins = %pin_dir.display(),
            dns_capture = settings.dns_capture,
            "eBPF capture loaded"
        );
        Ok(ebpf)
    }

    fn set_config_log_level(&self, level: LogLevel) {
        if let Ok(mut c) = self.inner.config.lock()
            && let Err(e) = c.set(CONFIG_LOG_LEVEL, level as u32, 0)
        {
            warn!("setting the eBPF log level: {e}");
        }
    }
}

fn take_map(bpf: &mut aya::Ebpf, name: &str) -> Result<aya::maps::Map, String> {
    bpf.take_map(name)
        .ok_or_else(|| format!("the eBPF object has no map {name}"))
}

/// The cgroup that holds every pod, as kubelet names it (systemd or cgroupfs driver).
fn detect_pod_cgroup(root: &Path) -> Result<PathBuf, String> {
    for name in ["kubepods.slice", "kubepods"] {
        let p = root.join(name);
        if p.is_dir() {
            return Ok(p);
        }
    }
    Err(format!(
        "no kubepods.slice or kubepods cgroup under {}: pass --pod-cgroup",
        root.display()
    ))
}

fn program<'a, T>(bpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = bpf
        .program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?;
    p.try_into().map_err(|e| format!("program {name}: {e}"))
}

/// A verifier rejection or EINVAL/EPERM at load, with what it most likely means.
fn load_error(name: &str, e: &aya::programs::ProgramError) -> String {
    let mut text = format!("loading {name}: {e}");
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = e {
        let log = verifier_log.to_string();
        let last: Vec<&str> = log.lines().rev().take(6).collect();
        text.push_str(&format!(
            " (verifier: {})",
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
        if log.contains("unknown func") {
            text.push_str(
                "; a helper is missing: bpf_get_netns_cookie in cgroup programs needs Linux 5.7, \
                 bpf_sk_assign in sk_lookup Linux 5.9",
            );
        }
    }
    text
}

fn attach_error(name: &str, cgroup: &Path, e: &aya::programs::ProgramError) -> String {
    let mut text = format!("attaching {name} to {}: {e}", cgroup.display());
    let s = format!("{e:?}");
    if s.contains("EINVAL") || s.contains("Invalid argument") {
        text.push_str(
            " (link-based cgroup attach needs Linux 5.7, sendmsg hooks 4.18, recvmsg hooks 5.2, \
             getpeername hooks 5.8)",
        );
    } else if s.contains("EPERM") || s.contains("permitted") {
        text.push_str(" (needs CAP_NET_ADMIN and CAP_BPF)");
    }
    text
}

/// Pin `link` at `path`; a link pinned there by a previous run stays attached until the new
/// one is in place, so capture never has a gap.
fn replace_pin(link: FdLink, path: &Path) -> Result<(), String> {
    let old = if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(p) => Some(
                p.unpin()
                    .map_err(|e| format!("unpinning {}: {e}", path.display()))?,
            ),
            Err(e) => {
                warn!(path = %path.display(), "removing an unreadable pin: {e}");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    } else {
        None
    };
    link.pin(path)
        .map_err(|e| format!("pinning {}: {e}", path.display()))?;
    // Dropping the last reference to the old link detaches it.
    drop(old);
    Ok(())
}

/// Forward aya-log records (through the `log` crate into tracing) as they arrive.
fn start_logger(bpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(bpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's descriptor for as long as it is registered.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!("eBPF logs unavailable: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::v4(v4.octets()),
        IpAddr::V6(v6) => IpKey::v6(v6.octets()),
    }
}

/// The network namespace cookie of the namespace a socket lives in.
fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("SO_NETNS_COOKIE (Linux 5.14): {e}"),
        ));
    }
    Ok(cookie)
}

impl Redirector for Ebpf {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    /// Listeners are open; sockmap entries, then the enrolled-map entry, then the sk_lookup link.
    fn enroll(&self, pod: &PodTarget<'_>) -> Result<Arc<dyn PodCapture>, String> {
        let inner = &self.inner;
        let first = pod
            .plaintext
            .first()
            .ok_or("no inbound listener to capture into")?;
        let cookie = netns_cookie(*first).map_err(|e| format!("pod netns cookie: {e}"))?;
        let mut info = PodInfo {
            uid_hash: uid_hash(pod.uid),
            ..PodInfo::default()
        };
        let mut keys = vec![];
        // A successor owns the inbound sockmap. Our listener must not replace its entry: ours
        // leaves the map when we drain and close it, and nothing would put the successor's
        // back (it writes a pod's entry once, at enrollment). Ours goes in only where there is
        // none yet (the successor has not enrolled the pod yet), so the pod is served at once;
        // the successor's replaces it when it enrolls the pod. Either way our listeners get
        // their share through the reuseport group.
        let owner = inner.owner.still_ours();
        for ip in pod.addresses {
            let listener = pod
                .plaintext
                .iter()
                .find(|l| l.local_addr().map(|a| a.is_ipv4()).ok() == Some(ip.is_ipv4()));
            let Some(listener) = listener else {
                continue;
            };
            let key = ip_key(*ip);
            if owner {
                insert_listener(inner, &key, listener, 0)?;
                keys.push(key);
            } else if !insert_listener(inner, &key, listener, BPF_NOEXIST)? {
                debug!(
                    uid = pod.uid,
                    "the successor's listener is in the inbound sockmap already"
                );
            }
            match ip {
                IpAddr::V4(v4) => info.ip4 = v4.octets(),
                IpAddr::V6(v6) => info.ip6 = v6.octets(),
            }
        }
        let capture = Arc::new(EbpfPod {
            inner: inner.clone(),
            uid: pod.uid.to_string(),
            cookie,
            keys,
            link_pin: inner.pods_dir.join(pod.uid),
        });
        lock(&inner.enrolled)?
            .insert(cookie, info, 0)
            .map_err(|e| {
                let _ = capture.remove();
                format!("enrolled map: {e}")
            })?;
        if let Err(e) = attach_sk_lookup(inner, pod.netns, &capture.link_pin) {
            let _ = capture.remove();
            return Err(e);
        }
        lock(&inner.cookies)?.insert(pod.uid.to_string(), cookie);
        debug!(uid = pod.uid, cookie, "eBPF capture on");
        Ok(capture)
    }

    fn set_log_level(&self, level: LogLevel) {
        self.set_config_log_level(level);
    }

    fn retain(&self, enrolled: &[String], pending: &[String]) {
        let inner = &self.inner;
        // A successor has started (an upgrade): its pods' pins and entries are its own, and
        // this instance's view of the mesh may lag behind its view.
        if !inner.owner.still_ours() {
            return;
        }
        let keep: HashSet<&str> = enrolled.iter().chain(pending).map(String::as_str).collect();
        if let Ok(entries) = std::fs::read_dir(&inner.pods_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !keep.contains(name.as_str()) {
                    info!(uid = %name, "removing pinned capture of a pod no longer here");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let current: StdHashMap<u64, u64> = match inner.cookies.lock() {
            Ok(c) => c
                .iter()
                .map(|(uid, cookie)| (uid_hash(uid), *cookie))
                .collect(),
            Err(_) => return,
        };
        let pending: HashSet<u64> = pending.iter().map(|u| uid_hash(u)).collect();
        let Ok(mut map) = inner.enrolled.lock() else {
            return;
        };
        let stale: Vec<u64> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(cookie, info)| match current.get(&info.uid_hash) {
                Some(c) => c != cookie,
                None => !pending.contains(&info.uid_hash),
            })
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in stale {
            debug!(cookie, "removing a stale enrolled-map entry");
            let _ = map.remove(&cookie);
        }
    }
}

/// Which ztunnel owns the shared capture state (sweeping pins of unknown pods, the inbound
/// sockmap): the one with the greatest directory `<pin dir>/owner-<start time>-<pid>` (bpffs
/// holds directories besides pins, but no plain files nor symlinks), the one started last.
/// Each instance makes its own at start and removes older ones. Two instances run side by side
/// during an upgrade; the old one, draining or with a view of the mesh a moment behind, must
/// not remove or replace what the new one set up.
struct Owner {
    pin_dir: PathBuf,
    name: String,
    /// Set once a newer instance is seen; never cleared (a newer instance does not hand back).
    superseded: std::sync::atomic::AtomicBool,
}

const OWNER_PREFIX: &str = "owner-";

impl Owner {
    fn take(pin_dir: &Path) -> Result<Owner, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Fixed width: names order as start times do.
        let name = format!("{OWNER_PREFIX}{nanos:024}-{}", std::process::id());
        let dir = pin_dir.join(&name);
        std::fs::create_dir(&dir).map_err(|e| {
            format!(
                "marking the pins as this instance's ({}): {e}",
                dir.display()
            )
        })?;
        for other in owner_names(pin_dir) {
            if other < name {
                let _ = std::fs::remove_dir(pin_dir.join(other));
            }
        }
        Ok(Owner {
            pin_dir: pin_dir.to_path_buf(),
            name,
            superseded: Default::default(),
        })
    }

    fn still_ours(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.superseded.load(Ordering::Relaxed) {
            return false;
        }
        let newest = owner_names(&self.pin_dir).into_iter().max();
        // Our own gone (removed by hand) yet nobody newer: still ours.
        if newest.as_ref().is_none_or(|n| *n <= self.name) {
            return true;
        }
        self.superseded.store(true, Ordering::Relaxed);
        info!(
            successor = ?newest,
            "a newer ztunnel owns the pinned eBPF state: this one leaves the inbound sockmap and the clean-up of unknown pods to it"
        );
        false
    }
}

fn owner_names(pin_dir: &Path) -> Vec<String> {
    std::fs::read_dir(pin_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(OWNER_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, String> {
    m.lock().map_err(|_| "eBPF state lock poisoned".to_string())
}

/// `BPF_NOEXIST`: add a map entry only where there is none.
const BPF_NOEXIST: u64 = 1;

/// Put `listener` in the inbound sockmap under `key`; false when `flags` has `BPF_NOEXIST` and
/// an entry was there already.
fn insert_listener(
    inner: &Inner,
    key: &IpKey,
    listener: &TcpListener,
    flags: u64,
) -> Result<bool, String> {
    match lock(&inner.inbound)?.insert(key, listener.as_fd().as_raw_fd(), flags) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e))
            if flags & BPF_NOEXIST != 0 && e.io_error.raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(e) => Err(format!("adding the 15006 listener to the sockmap: {e}")),
    }
}

fn attach_sk_lookup(inner: &Inner, netns: &Path, pin: &Path) -> Result<(), String> {
    let ns = File::open(netns).map_err(|e| format!("opening {}: {e}", netns.display()))?;
    let mut bpf = lock(&inner.bpf)?;
    let prog: &mut SkLookup = program(&mut bpf, SK_LOOKUP_PROGRAM)?;
    let id = prog
        .attach(&ns)
        .map_err(|e| format!("attaching sk_lookup to {}: {e}", netns.display()))?;
    let link = FdLink::from(prog.take_link(id).map_err(|e| e.to_string())?);
    replace_pin(link, pin)
}

struct EbpfPod {
    inner: Arc<Inner>,
    uid: String,
    cookie: u64,
    keys: Vec<IpKey>,
    link_pin: PathBuf,
}

impl PodCapture for EbpfPod {
    fn outbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let peer = stream.peer_addr()?;
        let key = PortKey {
            netns_cookie: self.cookie,
            port: peer.port(),
            family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        };
        let mut map = self
            .inner
            .orig_by_port
            .lock()
            .map_err(|_| io::Error::other("eBPF state lock poisoned"))?;
        let orig = map.get(&key, 0).map_err(|e| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no original destination recorded for client port {}: {e}",
                    peer.port()
                ),
            )
        })?;
        // The entry served its purpose; the LRU would evict it eventually anyway.
        let _ = map.remove(&key);
        Ok(orig_addr(&orig))
    }

    /// sk_lookup assigns the connection without rewriting it: the local address is the original.
    fn inbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }

    /// Reverse of enroll: the sk_lookup link, the enrolled-map entry, the sockmap entries (not
    /// when a successor owned the sockmap at enrollment: an entry we made then leaves it with
    /// our listener, and the key may hold the successor's).
    fn remove(&self) -> Result<(), String> {
        if self.link_pin.exists() {
            std::fs::remove_file(&self.link_pin)
                .map_err(|e| format!("unpinning {}: {e}", self.link_pin.display()))?;
        }
        if let Ok(mut m) = self.inner.enrolled.lock() {
            let _ = m.remove(&self.cookie);
        }
        if let Ok(mut m) = self.inner.inbound.lock() {
            for k in &self.keys {
                let _ = m.remove(k);
            }
        }
        if let Ok(mut c) = self.inner.cookies.lock()
            && c.get(&self.uid) == Some(&self.cookie)
        {
            c.remove(&self.uid);
        }
        Ok(())
    }
}

fn orig_addr(o: &OrigDst) -> SocketAddr {
    let ip = if o.family == AF_INET6 {
        // connect6 records IPv4-mapped destinations as IPv4; canonical form in any case, so
        // routing and policies see one address per destination.
        IpAddr::V6(Ipv6Addr::from(o.addr)).to_canonical()
    } else {
        IpAddr::V4(Ipv4Addr::new(o.addr[0], o.addr[1], o.addr[2], o.addr[3]))
    };
    SocketAddr::new(ip, o.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_address_from_map_value() {
        let mut o = OrigDst {
            family: AF_INET,
            port: 8080,
            ..OrigDst::default()
        };
        o.addr[..4].copy_from_slice(&[10, 244, 2, 10]);
        assert_eq!(orig_addr(&o), "10.244.2.10:8080".parse().unwrap());
        o.family = AF_INET6;
        o.addr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(orig_addr(&o), "[fd00::1]:8080".parse().unwrap());
        o.addr = "::ffff:10.244.2.10".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(orig_addr(&o), "10.244.2.10:8080".parse().unwrap());
    }

    #[test]
    fn the_instance_started_last_owns_the_pins() {
        let dir = std::env::temp_dir().join(format!("pin-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = Owner::take(&dir).unwrap();
        assert!(old.still_ours());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let new = Owner::take(&dir).unwrap();
        assert!(new.still_ours());
        assert!(!old.still_ours(), "the predecessor stops sweeping");
        // Only the newest one's mark is left.
        assert_eq!(owner_names(&dir), vec![new.name.clone()]);
        // One made a moment before the newest, but after it looked: not the owner either.
        let late = format!("{OWNER_PREFIX}{:024}-1", 1);
        std::fs::create_dir(dir.join(&late)).unwrap();
        assert!(new.still_ours());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn detects_kubelet_pod_cgroup() {
        let root = std::env::temp_dir().join(format!("podcg-{}", std::process::id()));
        assert!(detect_pod_cgroup(&root).is_err());
        std::fs::create_dir_all(root.join("kubepods.slice")).unwrap();
        assert_eq!(
            detect_pod_cgroup(&root).unwrap(),
            root.join("kubepods.slice")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
