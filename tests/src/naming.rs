//! Names and identifiers of test bed objects: instance prefixes, pod UIDs, container IDs.

/// Length of an instance prefix: `ztb` and five hex digits.
pub(crate) const PREFIX_LEN: usize = 8;

/// A fresh instance prefix such as `ztb3fa09`.
pub(crate) fn new_prefix() -> String {
    format!("ztb{:05x}", fastrand::u32(..0x10_0000))
}

/// Whether `name` is exactly an instance prefix (what a test bed's cgroup directory is called).
pub(crate) fn is_prefix(name: &str) -> bool {
    name.len() == PREFIX_LEN
        && name.starts_with("ztb")
        && name[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `name` is a network namespace made by some test bed (`<prefix>-<suffix>`).
pub(crate) fn is_testbed_netns(name: &str) -> bool {
    name.len() > PREFIX_LEN + 1
        && name.is_char_boundary(PREFIX_LEN)
        && is_prefix(&name[..PREFIX_LEN])
        && name.as_bytes()[PREFIX_LEN] == b'-'
}

/// A random UUID version 4 in its lowercase text form, as the API server assigns to pods.
pub(crate) fn new_pod_uid() -> String {
    let mut b = [0u8; 16];
    fastrand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A random 64-hex-digit container ID, the form containerd uses.
pub(crate) fn new_container_id() -> String {
    let mut b = [0u8; 32];
    fastrand::fill(&mut b);
    hex(&b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Pod names end up in netns names and file paths, so keep them to a DNS label's alphabet.
pub(crate) fn check_pod_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    anyhow::ensure!(
        ok,
        "invalid pod name {name:?}: use 1-40 characters of a-z, 0-9 and '-', not starting or ending with '-'"
    );
    // The underlay netns is `<prefix>-ul` and nodes are `<prefix>-nN`.
    anyhow::ensure!(
        name != "ul" && !is_node_suffix(name),
        "pod name {name:?} would clash with a node or underlay netns name"
    );
    Ok(())
}

fn is_node_suffix(name: &str) -> bool {
    name.strip_prefix('n')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_recognised() {
        for _ in 0..100 {
            let p = new_prefix();
            assert!(is_prefix(&p), "{p}");
            assert!(is_testbed_netns(&format!("{p}-ul")));
        }
        assert!(!is_prefix("ztb1234"));
        assert!(!is_prefix("ztb123456"));
        assert!(!is_prefix("ztb1234g"));
        assert!(!is_prefix("ztb1234F"));
        assert!(!is_testbed_netns("ztb12345"));
        assert!(!is_testbed_netns("ztb12345-"));
        assert!(!is_testbed_netns("ztb12345_n1"));
        assert!(!is_testbed_netns("cni-1234-5678"));
        assert!(!is_testbed_netns("ztb1é345-n1"));
    }

    #[test]
    fn pod_uid_is_uuid_v4() {
        for _ in 0..100 {
            let u = new_pod_uid();
            assert_eq!(u.len(), 36);
            let parts: Vec<&str> = u.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(parts[2].starts_with('4'), "{u}");
            assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{u}");
            assert!(
                u.bytes()
                    .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
    }

    #[test]
    fn container_id_is_64_hex() {
        let id = new_container_id();
        assert_eq!(id.len(), 64);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn pod_names() {
        for ok in ["a", "client", "server-1", "x9"] {
            assert!(check_pod_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "ul", "n1", "n12"] {
            assert!(check_pod_name(bad).is_err(), "{bad}");
        }
        assert!(check_pod_name("n").is_ok());
        assert!(check_pod_name("nginx").is_ok());
    }
}
