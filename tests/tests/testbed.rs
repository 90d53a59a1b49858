//! End-to-end checks of the test bed itself: pod-to-pod routing across nodes, pod cgroups, capture and teardown.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::{PodSpec, Testbed, netns_path};

/// Builds a test bed, or returns `None` (after saying why) when not privileged to.
fn testbed(nodes: usize, pods: &[PodSpec]) -> Option<Testbed> {
    if let Err(e) = Testbed::check_privileges() {
        eprintln!("skipping: {e}");
        return None;
    }
    let started = Instant::now();
    let bed = Testbed::new(nodes, pods).expect("cannot build the test bed");
    eprintln!("built test bed {} in {:?}", bed.prefix, started.elapsed());
    Some(bed)
}

/// Two pods on each of two nodes.
fn two_by_two() -> Vec<PodSpec> {
    vec![
        PodSpec::new("client", "default", 0),
        PodSpec::new("client2", "apps", 0),
        PodSpec::new("server", "default", 1),
        PodSpec::new("server2", "apps", 1),
    ]
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that nothing of the test bed with `prefix` and `cgroup_root` is left.
fn assert_gone(prefix: &str, cgroup_root: &Path) {
    assert_eq!(netns_with_prefix(prefix), Vec::<String>::new());
    assert!(
        !cgroup_root.exists(),
        "{} still exists",
        cgroup_root.display()
    );
}

fn netns_inode(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path.as_ref())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.as_ref().display()))
        .ino()
}

/// Dual-stack: right after the test bed is built (no wait for duplicate address detection),
/// a pod reaches a pod on the other node over IPv6, the server sees the client's own IPv6
/// address, and the underlay capture decodes the IPv6 packets.
#[test]
fn pod_reaches_pod_on_other_node_over_ipv6() {
    let Some(bed) = testbed(2, &two_by_two()) else {
        return;
    };
    let client = bed.pod("client").clone();
    let server = bed.pod("server").clone();
    assert_eq!(
        client.ip6,
        "fd00:10:244:1::a".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(
        server.ip6,
        "fd00:10:244:2::a".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(bed.nodes[1].underlay_ip6.to_string(), "fd00:172:30::2");

    let capture = bed.capture(0).unwrap();
    let listener = bed
        .in_netns(&server.netns, || {
            TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 8080))
        })
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&buf[..n]).unwrap();
        peer
    });
    let dst = SocketAddr::from((server.ip6, 8080));
    let mut conn = bed
        .in_pod("client", || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(2))
        })
        .unwrap()
        .expect("client pod cannot connect to server pod over IPv6");
    conn.write_all(b"v6 marker").unwrap();
    let mut reply = [0u8; 9];
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"v6 marker");
    let local = conn.local_addr().unwrap();
    drop(conn);
    let peer = echo.join().unwrap();
    assert_eq!(peer, local);
    assert_eq!(peer.ip(), std::net::IpAddr::V6(client.ip6));

    let report = capture.stop();
    assert!(report.contains(b"v6 marker"), "IPv6 payload not captured");
    assert!(
        report
            .packets()
            .iter()
            .any(|p| p.src == local && p.dst == dst && p.flags.syn()),
        "no SYN {local} > {dst} on the underlay"
    );
}

#[test]
fn pod_reaches_pod_on_other_node_and_capture_sees_it() {
    let Some(bed) = testbed(2, &two_by_two()) else {
        return;
    };
    let (prefix, cgroup_root) = (bed.prefix.clone(), bed.cgroup_root().to_path_buf());
    let client = bed.pod("client").clone();
    let server = bed.pod("server").clone();
    assert_eq!(client.ip, Ipv4Addr::new(10, 244, 1, 10));
    assert_eq!(bed.pod("client2").ip, Ipv4Addr::new(10, 244, 1, 11));
    assert_eq!(server.ip, Ipv4Addr::new(10, 244, 2, 10));
    assert_eq!(bed.nodes[1].underlay_ip, Ipv4Addr::new(172, 30, 0, 2));

    let capture = bed.capture(0).unwrap();

    let listener = bed
        .in_netns(&server.netns, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080))
        })
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&buf[..n]).unwrap();
        peer
    });

    let payload = format!("hello from {prefix}");
    let dst = SocketAddr::from((server.ip, 8080));
    let mut conn = bed
        .in_pod("client", || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(2))
        })
        .unwrap()
        .expect("client pod cannot connect to server pod on the other node");
    conn.write_all(payload.as_bytes()).unwrap();
    let mut reply = vec![0u8; payload.len()];
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(reply, payload.as_bytes());
    let local = conn.local_addr().unwrap();
    drop(conn);

    // The server sees the pod's own address: nothing is NATed on the way.
    let peer = echo.join().unwrap();
    assert_eq!(peer, local);
    assert_eq!(peer.ip(), client.ip);

    let report = capture.stop();
    assert!(
        report.contains(payload.as_bytes()),
        "payload not captured; saw:\n{}",
        report
            .packets()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let client_addr = SocketAddr::from(SocketAddrV4::new(client.ip, local.port()));
    let server_addr = SocketAddr::from(SocketAddrV4::new(server.ip, 8080));
    assert!(report.server_ports().contains(&8080));
    assert!(report.tcp_ports().contains(&(local.port(), 8080)));
    assert!(report.tcp_ports().contains(&(8080, local.port())));
    let to_server = report
        .packets()
        .iter()
        .filter(|p| p.src == client_addr && p.dst == server_addr);
    assert!(to_server.clone().any(|p| p.flags.syn()));
    assert!(to_server.clone().all(|p| p.outgoing));
    assert!(
        report
            .packets()
            .iter()
            .any(|p| p.src == server_addr && p.dst == client_addr && !p.outgoing)
    );
    let err = report.tls_only_on(15008).unwrap_err();
    assert!(err.contains("neither port is 15008"), "{err}");
    assert!(err.contains("does not start with a TLS record"), "{err}");

    drop(bed);
    assert_gone(&prefix, &cgroup_root);
}

#[test]
fn pause_process_is_in_pod_cgroup_and_netns() {
    let Some(bed) = testbed(2, &two_by_two()) else {
        return;
    };
    let (prefix, cgroup_root) = (bed.prefix.clone(), bed.cgroup_root().to_path_buf());
    assert!(prefix.starts_with("ztb") && prefix.len() == 8, "{prefix}");
    assert!(cgroup_root.ends_with(&prefix));

    let mut uids = Vec::new();
    for pod in &bed.pods {
        assert!(
            pod.netns.starts_with(&format!("{prefix}-")),
            "{}",
            pod.netns
        );
        let rel = pod.cgroup.strip_prefix(&cgroup_root).unwrap();
        let expected = PathBuf::from("kubepods.slice/kubepods-besteffort.slice").join(format!(
            "kubepods-besteffort-pod{}.slice",
            pod.uid.replace('-', "_")
        ));
        assert_eq!(rel.parent().unwrap(), expected);
        let scope = rel.file_name().unwrap().to_str().unwrap();
        let id = scope
            .strip_prefix("cri-containerd-")
            .and_then(|s| s.strip_suffix(".scope"))
            .unwrap();
        assert_eq!(id.len(), 64, "{scope}");

        let procs = std::fs::read_to_string(pod.cgroup.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pod.pause_pid.to_string()),
            "pause pid {} not in {}: {procs:?}",
            pod.pause_pid,
            pod.cgroup.display()
        );
        assert_eq!(
            netns_inode(format!("/proc/{}/ns/net", pod.pause_pid)),
            netns_inode(netns_path(&pod.netns)),
            "pause process of {} is not in its netns",
            pod.name
        );
        uids.push(pod.uid.clone());
    }
    uids.dedup();
    assert_eq!(uids.len(), 4);

    let pids: Vec<u32> = bed.pods.iter().map(|p| p.pause_pid).collect();
    drop(bed);
    assert_gone(&prefix, &cgroup_root);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pause process {pid} survived teardown"
        );
    }
}

#[test]
fn spawned_processes_join_pod_or_node_and_die_at_teardown() {
    let Some(mut bed) = testbed(1, &[PodSpec::new("app", "default", 0)]) else {
        return;
    };
    let (prefix, cgroup_root) = (bed.prefix.clone(), bed.cgroup_root().to_path_buf());
    let pod = bed.pod("app").clone();

    let mut cmd = Command::new("sh");
    cmd.args(["-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"])
        .stdout(Stdio::piped());
    let out = bed
        .spawn_in_pod("app", cmd)
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let rel = pod
        .cgroup
        .strip_prefix(cgroup_root.parent().unwrap())
        .unwrap();
    assert!(
        text.lines().any(|l| l == format!("0::/{}", rel.display())),
        "not in the pod cgroup: {text}"
    );
    let pod_ino = netns_inode(netns_path(&pod.netns));
    assert!(text.contains(&format!("net:[{pod_ino}]")), "{text}");

    let mut cmd = Command::new("readlink");
    cmd.arg("/proc/self/ns/net").stdout(Stdio::piped());
    let out = bed
        .spawn_in_node(0, cmd)
        .unwrap()
        .wait_with_output()
        .unwrap();
    let node_ino = netns_inode(netns_path(&bed.nodes[0].netns));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("net:[{node_ino}]")
    );

    let mut in_pod = bed
        .spawn_in_pod("app", {
            let mut c = Command::new("sleep");
            c.arg("1000");
            c
        })
        .unwrap();
    let mut in_node = bed
        .spawn_in_node(0, {
            let mut c = Command::new("sleep");
            c.arg("1000");
            c
        })
        .unwrap();

    bed.teardown();
    bed.teardown();
    assert_eq!(in_pod.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!(in_node.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert_gone(&prefix, &cgroup_root);
}

#[tokio::test]
async fn async_spawn_and_tokio_sockets() {
    let Some(bed) = testbed(
        1,
        &[
            PodSpec::new("a", "default", 0),
            PodSpec::new("b", "default", 0),
        ],
    ) else {
        return;
    };
    let b = bed.pod("b").clone();
    let std_listener = bed
        .in_pod("b", || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 9000))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.map(|(_, peer)| peer) });

    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "cat /proc/self/cgroup"])
        .stdout(Stdio::piped());
    let out = bed
        .spawn_in_pod_async("a", cmd)
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cri-containerd-"),
        "{out:?}"
    );

    let dst = SocketAddr::from((b.ip, 9000));
    let socket = bed
        .in_pod("a", || {
            let s = tokio::net::TcpSocket::new_v4()?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(dst))
        .await
        .expect("connect timed out")
        .unwrap();
    let peer = accept.await.unwrap().unwrap();
    assert_eq!(peer, stream.local_addr().unwrap());
    assert_eq!(peer.ip(), bed.pod("a").ip);
}

#[test]
fn teardown_runs_when_a_test_panics() {
    if let Err(e) = Testbed::check_privileges() {
        eprintln!("skipping: {e}");
        return;
    }
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed = Testbed::new(1, &[PodSpec::new("doomed", "default", 0)]).unwrap();
        seen = Some((bed.prefix.clone(), bed.cgroup_root().to_path_buf()));
        panic!("test failure inside a test bed");
    }));
    assert!(result.is_err());
    let (prefix, cgroup_root) = seen.unwrap();
    assert_gone(&prefix, &cgroup_root);
}

#[test]
fn bad_specs_are_rejected_without_leftovers() {
    if let Err(e) = Testbed::check_privileges() {
        eprintln!("skipping: {e}");
        return;
    }
    let err = Testbed::new(1, &[PodSpec::new("x", "default", 1)]).unwrap_err();
    assert!(err.to_string().contains("only 1 nodes"), "{err}");
    let err = Testbed::new(1, &[PodSpec::new("n1", "default", 0)]).unwrap_err();
    assert!(err.to_string().contains("clash"), "{err}");
}
