//! The test bed's waypoint launching ([`Cluster::start_waypoints`]): the process starts inside
//! the waypoint pod with the flags the test bed promises, readiness is awaited, and a missing
//! binary fails clearly. A probe script (tests/fixtures/waypoint_launch_probe.py) takes the
//! binary's place, so this checks the harness alone; the waypoint's own tests use the real one.
//! `WAYPOINT_BIN` is set for this test binary only (each file in tests/ is its own process).

use std::os::unix::fs::MetadataExt;

use testbed::cluster::{Cluster, ClusterSpec, ControlPlaneMode, PodDef, ServiceDef};

const PROBE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/waypoint_launch_probe.py"
);

fn spec() -> ClusterSpec {
    ClusterSpec {
        control_plane: ControlPlaneMode::Pilot,
        nodes: 1,
        pods: vec![
            PodDef::new("client", "client", 0, true),
            PodDef::waypoint("waypoint-a", "waypoint", 0),
        ],
        services: vec![ServiceDef::waypoint(
            "waypoint",
            std::net::Ipv4Addr::new(10, 96, 0, 20),
        )],
        start_waypoints: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_process_runs_in_its_pod_with_its_flags() {
    if !testbed::can_run() {
        return;
    }
    // SAFETY: the only test in this process; set before any cluster starts.
    unsafe { std::env::set_var("WAYPOINT_BIN", "/nonexistent/waypoint") };
    let err = Cluster::start(spec())
        .await
        .err()
        .expect("started without a binary");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("/nonexistent/waypoint") && msg.contains("cargo build -p waypoint"),
        "{msg}"
    );

    // SAFETY: as above; no cluster is running now.
    unsafe { std::env::set_var("WAYPOINT_BIN", PROBE) };
    let mut c = Cluster::start(spec()).await.unwrap();
    assert_eq!(c.waypoint_pods(), ["waypoint-a"]);
    let pid = c.waypoint_pid("waypoint-a").expect("waypoint started");

    // Inside the pod's network namespace.
    let ns_of = |p: &str| std::fs::metadata(p).unwrap().ino();
    let pod_ns = testbed::netns_path(&c.bed.pod("waypoint-a").netns);
    assert_eq!(
        ns_of(&format!("/proc/{pid}/ns/net")),
        ns_of(pod_ns.to_str().unwrap())
    );

    // With the flags of `WaypointLaunch::args`, naming pilot's files for its service account.
    let log = std::fs::read_to_string(c.waypoint_log("waypoint-a")).unwrap();
    let args: Vec<String> = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let launch = c.waypoint_launch("waypoint-a");
    assert_eq!(args, launch.args());
    assert!(
        launch
            .token_file
            .ends_with("pilot/tokens/sa/demo.waypoint.token"),
        "{}",
        launch.token_file.display()
    );
    assert!(
        launch.root_cert.is_file(),
        "pilot's root is where the flag says"
    );
    assert_eq!(launch.pod_ip, c.pod_ip("waypoint-a"));
    assert_eq!(launch.pilot, c.pilot_addr());

    // Ready (start waited for it), reachable on the pod's own address.
    let (status, _) = c
        .pod_http_get("waypoint-a", 15021, "/healthz/ready")
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Waypoint pods run no app.
    assert!(
        c.pod_http_get("waypoint-a", testbed::cluster::HTTP_PORT, "/")
            .await
            .is_err()
    );

    c.stop_waypoint("waypoint-a").unwrap();
    assert_eq!(c.waypoint_pid("waypoint-a"), None);
    assert!(
        c.pod_http_get("waypoint-a", 15021, "/healthz/ready")
            .await
            .is_err()
    );
}
