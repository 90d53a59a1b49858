//! Capture with nftables inside a pod's network namespace, equivalent to Istio's in-pod iptables:
//! outbound TCP → 15001, inbound TCP (except HBONE on 15008) → 15006, the proxy's own marked
//! sockets untouched. The fallback for kernels without the eBPF features.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The kubelet's probe source address, exempt from capture as in Istio.
const KUBELET_PROBE_SRC: &str = "169.254.7.127";
const TABLE: &str = "ztunnel";

/// The ruleset for one pod; applying it replaces any previous one atomically.
pub fn ruleset(mark: u32) -> String {
    format!(
        r#"table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    meta mark {mark:#x} return
    iifname "lo" return
    ip saddr {KUBELET_PROBE_SRC} return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {mark:#x} return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    fib daddr type local return
    meta l4proto tcp redirect to :15001
  }}
}}
"#
    )
}

/// Install the capture rules in the namespace at `netns`.
pub fn install(netns: &Path, mark: u32) -> Result<(), String> {
    nft(netns, &ruleset(mark))
}

/// Remove them; new connections then go direct.
pub fn remove(netns: &Path) -> Result<(), String> {
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
        let r = super::ruleset(0x539);
        assert!(r.contains("meta mark 0x539 return"));
        assert!(r.contains("tcp dport 15008 return"));
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("redirect to :15006"));
    }
}
