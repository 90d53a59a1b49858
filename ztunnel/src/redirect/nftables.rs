//! Capture with nftables inside a pod's network namespace, equivalent to Istio's in-pod iptables:
//! outbound TCP → 15001, inbound TCP (except HBONE on 15008) → 15006, DNS (UDP and TCP to port
//! 53, when DNS capture is on) → 15053, the proxy's own marked sockets untouched. The fallback
//! for kernels without the eBPF features.
//!
//! Each pod's ruleset is one `nft -f -` transaction run in the pod's namespace (`nsenter`):
//! the kernel applies the whole script atomically, replacing what a previous ztunnel left.
//! A process rather than netlink because nftables' netlink messages are bytecode, not rules:
//! the `nat` hooks, `redirect`, `fib daddr type local` and the set of exemptions would be
//! hand-assembled expressions (no maintained Rust crate builds them from rule text; `nftnl`
//! binds libnftnl and needs the C library), and the JSON API is the same `nft` program or
//! libnftables. The node agent calls [`Redirector::enroll`] and [`PodCapture::remove`] on
//! blocking threads with no lock held, so the process costs one enrollment its time (a few
//! milliseconds) and nothing else.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use mesh::socket::{DELIVERY_MARK, PROXY_MARK};
use tokio::net::TcpStream;

use super::{PodCapture, PodTarget, Redirector};

/// The kubelet's probe source addresses, exempt from capture as in Istio.
const KUBELET_PROBE_SRC: &str = "169.254.7.127";
const KUBELET_PROBE_SRC6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
const TABLE: &str = "ztunnel";

/// Capture with nftables rules in each pod.
pub struct Nftables {
    dns_capture: bool,
}

impl Nftables {
    /// Checks that `nft` and `nsenter` can be run.
    pub fn new(dns_capture: bool) -> Result<Nftables, String> {
        for tool in ["nft", "nsenter"] {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| {
                    format!("nftables capture needs `{tool}` (package nftables / util-linux): {e}")
                })?;
        }
        Ok(Nftables { dns_capture })
    }
}

impl Redirector for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn enroll(&self, pod: &PodTarget<'_>) -> Result<Arc<dyn PodCapture>, String> {
        install(pod.netns, PROXY_MARK, self.dns_capture)?;
        Ok(Arc::new(NftPod {
            netns: pod.netns.to_path_buf(),
        }))
    }
}

struct NftPod {
    netns: PathBuf,
}

impl PodCapture for NftPod {
    fn outbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        mesh::socket::original_dst(stream)
    }

    fn inbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        mesh::socket::original_dst(stream)
    }

    fn remove(&self) -> Result<(), String> {
        remove(&self.netns)
    }
}

/// Original destinations from netfilter (SO_ORIGINAL_DST), for rules ztunnel did not install.
pub struct NetfilterDst;

impl PodCapture for NetfilterDst {
    fn outbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        mesh::socket::original_dst(stream)
    }

    fn inbound_original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        mesh::socket::original_dst(stream)
    }

    fn remove(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The ruleset for one pod; applying it replaces any previous one atomically. With `dns`, UDP
/// and TCP to port 53 go to the pod's DNS proxy (conntrack shows the replies as coming from the
/// resolver the application asked); without it UDP 53 is untouched and TCP 53 is captured like
/// any TCP.
pub fn ruleset(mark: u32, dns: bool) -> String {
    let dns_rules = if dns {
        "    udp dport 53 redirect to :15053\n    tcp dport 53 redirect to :15053\n"
    } else {
        ""
    };
    format!(
        r#"table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    meta mark {mark:#x} return
    iifname "lo" return
    ip saddr {KUBELET_PROBE_SRC} return
    ip6 saddr {KUBELET_PROBE_SRC6} return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {mark:#x} return
    meta mark {DELIVERY_MARK:#x} return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    fib daddr type local return
{dns_rules}    meta l4proto tcp redirect to :15001
  }}
}}
"#
    )
}

/// Install the capture rules in the namespace at `netns`.
fn install(netns: &Path, mark: u32, dns: bool) -> Result<(), String> {
    nft(netns, &ruleset(mark, dns))
}

/// Remove them; new connections then go direct.
fn remove(netns: &Path) -> Result<(), String> {
    nft(
        netns,
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
}

fn nft(netns: &Path, script: &str) -> Result<(), String> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nsenter/nft (is the nftables package installed?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing nft rules: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {}: {}",
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ruleset_skips_marked_and_hbone() {
        let r = super::ruleset(0x539, false);
        assert!(r.contains("meta mark 0x539 return"));
        assert!(
            r.contains("meta mark 0x111 return"),
            "replies of source-preserved delivery"
        );
        assert!(r.contains("tcp dport 15008 return"));
        assert!(r.contains("ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return"));
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("redirect to :15006"));
        assert!(!r.contains("15053"), "{r}");
    }

    #[test]
    fn dns_rules_come_after_the_exemptions_and_before_tcp_capture() {
        let r = super::ruleset(0x539, true);
        let at = |needle: &str| r.find(needle).unwrap_or_else(|| panic!("{needle}: {r}"));
        let output = at("chain output");
        let udp = at("udp dport 53 redirect to :15053");
        let tcp = at("tcp dport 53 redirect to :15053");
        // Marked (ztunnel's upstream queries) and loopback first; DNS before TCP → 15001.
        let loopback = at("ip daddr 127.0.0.0/8 return");
        assert!(output < loopback && loopback < udp);
        assert!(r[output..udp].contains("meta mark 0x539 return"));
        assert!(at("fib daddr type local return") < udp);
        assert!(tcp < at("meta l4proto tcp redirect to :15001"));
        assert!(udp > output && tcp > output);
    }
}
