//! The CA's roots and their rotation: the root that signs, the bundle of roots proxies trust
//! (the signing root first; during a rotation also the next or the previous one), where they
//! are kept (the state folder or the Secret `istio-ca-secret`), and the three steps that replace
//! a root without a moment in which two proxies do not trust each other.
//!
//! A rotation, with at least one certificate lifetime (`--max-cert-ttl-secs`) between steps so
//! that every proxy has renewed its certificate and with it the bundle:
//! 1. `prepare`: a new root is generated and trusted beside the current one, which still signs.
//! 2. `activate`: the new root signs; the old one stays trusted (certificates it signed are
//!    still in use until they are renewed).
//! 3. `finish`: the old root is no longer trusted.
//!
//! pilot notices each step by itself (it reads the folder every 2 s, the Secret every 10 s), so
//! no restart is needed; certificates it issues from then on carry the new bundle, its serving
//! certificate is re-issued when the signing root changes, and the `istio-ca-root-cert`
//! ConfigMaps are updated.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh::ca::DevCa;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use tracing::{info, warn};

/// The roots in force: the one that signs, and the bundle every proxy trusts.
pub struct Roots {
    pub signing: DevCa,
    bundle_pem: String,
    count: usize,
}

impl std::fmt::Debug for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roots").field("count", &self.count).finish()
    }
}

impl Roots {
    /// `signing`, and the roots of `trusted_pem` besides it (the signing root is not repeated).
    pub fn new(signing: DevCa, trusted_pem: &str, origin: &str) -> anyhow::Result<Roots> {
        let mut bundle_pem = signing.root_pem().trim_end().to_string();
        bundle_pem.push('\n');
        let mut seen = vec![signing.root().clone()];
        for (text, der) in certificates(trusted_pem).with_context(|| origin.to_string())? {
            if !seen.contains(&der) {
                seen.push(der);
                bundle_pem.push_str(&text);
            }
        }
        Ok(Roots {
            signing,
            bundle_pem,
            count: seen.len(),
        })
    }

    /// Only `signing` trusted: no rotation under way.
    pub fn single(signing: DevCa) -> Roots {
        let bundle_pem = format!("{}\n", signing.root_pem().trim_end());
        Roots {
            signing,
            bundle_pem,
            count: 1,
        }
    }

    /// Every trusted root as PEM, the signing one first: the last element of a certificate
    /// response and the `root-cert.pem` of the `istio-ca-root-cert` ConfigMaps.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    pub fn count(&self) -> usize {
        self.count
    }
}

/// The PEM certificates of `text`, each as its own PEM text and its DER.
fn certificates(text: &str) -> anyhow::Result<Vec<(String, CertificateDer<'static>)>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let end = rest[start..]
            .find(END)
            .map(|e| start + e + END.len())
            .context("a certificate without its END line")?;
        let block = format!("{}\n", &rest[start..end]);
        let der = CertificateDer::from_pem_slice(block.as_bytes())
            .map_err(|e| anyhow::anyhow!("certificate {}: {e}", out.len() + 1))?;
        out.push((block, der));
        rest = &rest[end..];
    }
    if out.is_empty() && !text.trim().is_empty() {
        anyhow::bail!("no PEM certificate in it");
    }
    Ok(out)
}

/// Where the five parts are kept: file names in the state folder, or keys of the Secret.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    pub cert: &'static str,
    pub key: &'static str,
    pub trusted: &'static str,
    pub next_cert: &'static str,
    pub next_key: &'static str,
}

/// The state folder's files (the signing root keeps the names it always had).
pub const FOLDER: Names = Names {
    cert: "root-cert.pem",
    key: "root-key.pem",
    trusted: "trusted-roots.pem",
    next_cert: "next-root-cert.pem",
    next_key: "next-root-key.pem",
};

/// The keys of the Secret `istio-ca-secret` (istiod's names for the signing root).
pub const SECRET: Names = Names {
    cert: "ca-cert.pem",
    key: "ca-key.pem",
    trusted: "trusted-roots.pem",
    next_cert: "next-ca-cert.pem",
    next_key: "next-ca-key.pem",
};

/// The stored parts, by name.
pub type Stored = BTreeMap<String, String>;

/// The roots a store holds; `origin` names the folder or the Secret in errors.
pub fn load(stored: &Stored, names: &Names, origin: &str) -> anyhow::Result<Roots> {
    let get = |name: &str| {
        stored
            .get(name)
            .cloned()
            .with_context(|| format!("{origin}: no {name}"))
    };
    let signing = DevCa::from_pem(
        get(names.cert)?,
        &get(names.key)?,
        &format!("{origin} {}", names.cert),
        &format!("{origin} {}", names.key),
    )?;
    match stored.get(names.trusted) {
        Some(trusted) => Roots::new(signing, trusted, &format!("{origin} {}", names.trusted)),
        None => Ok(Roots::single(signing)),
    }
}

/// A step of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    /// Generate the next root and trust it beside the current one (which still signs).
    Prepare,
    /// The next root signs; the current one stays trusted.
    Activate,
    /// Stop trusting every root but the signing one.
    Finish,
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(&'static str, String),
    Remove(&'static str),
}

/// The writes of `step`, in an order in which every state between two writes trusts at least
/// what the state before and the state after trust, so that a reader (pilot, every 2 s) never
/// sees a bundle missing a root in use. (A signing certificate written before its key is
/// refused by [`load`], which keeps the last good roots.)
pub fn plan(
    step: Step,
    stored: &Stored,
    names: &Names,
    generate: impl FnOnce() -> anyhow::Result<DevCa>,
) -> anyhow::Result<Vec<Write>> {
    let trusted = stored.get(names.trusted).cloned().unwrap_or_default();
    let has_next = stored.contains_key(names.next_cert) || stored.contains_key(names.next_key);
    let joined = |a: &str, b: &str| format!("{}\n{}\n", a.trim_end(), b.trim_end());
    match step {
        Step::Prepare => {
            anyhow::ensure!(
                !has_next,
                "a next root is already prepared ({}): activate it first",
                names.next_cert
            );
            let next = generate()?;
            Ok(vec![
                Write::Put(names.next_key, next.key_pem()),
                Write::Put(names.next_cert, next.root_pem().to_string()),
                Write::Put(names.trusted, joined(&trusted, next.root_pem())),
            ])
        }
        Step::Activate => {
            let (Some(next_cert), Some(next_key)) =
                (stored.get(names.next_cert), stored.get(names.next_key))
            else {
                anyhow::bail!("no next root ({}): run prepare first", names.next_cert);
            };
            let current = stored
                .get(names.cert)
                .with_context(|| format!("no signing root ({})", names.cert))?;
            // The next root leaves the trusted list (it signs now, and is trusted as that);
            // the current one joins it.
            let mut kept = String::new();
            let next_der = CertificateDer::from_pem_slice(next_cert.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", names.next_cert))?;
            for (text, der) in certificates(&trusted)? {
                if der != next_der {
                    kept.push_str(&text);
                }
            }
            Ok(vec![
                Write::Put(names.trusted, joined(&trusted, current)),
                Write::Put(names.key, next_key.clone()),
                Write::Put(names.cert, next_cert.clone()),
                Write::Put(names.trusted, joined(&kept, current)),
                Write::Remove(names.next_cert),
                Write::Remove(names.next_key),
            ])
        }
        Step::Finish => {
            anyhow::ensure!(
                !has_next,
                "the prepared root ({}) does not sign yet: activate it first",
                names.next_cert
            );
            anyhow::ensure!(
                !trusted.trim().is_empty(),
                "only the signing root is trusted: no rotation to finish"
            );
            Ok(vec![Write::Remove(names.trusted)])
        }
    }
}

/// The parts of `names` present in folder `dir`.
pub fn read_folder(dir: &Path, names: &Names) -> anyhow::Result<Stored> {
    let mut stored = Stored::new();
    for name in [
        names.cert,
        names.key,
        names.trusted,
        names.next_cert,
        names.next_key,
    ] {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => {
                stored.insert(name.to_string(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", dir.join(name).display()));
            }
        }
    }
    Ok(stored)
}

/// Apply `writes` to folder `dir` one after the other, each file replaced whole (written
/// aside, then renamed), keys readable by the owner only.
pub fn write_folder(dir: &Path, writes: &[Write]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    for w in writes {
        match w {
            Write::Put(name, text) => {
                let path = dir.join(name);
                let aside = dir.join(format!(".{name}.new"));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&aside)
                    .with_context(|| format!("writing {}", aside.display()))?;
                std::io::Write::write_all(&mut f, text.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&aside, &path)
                    .with_context(|| format!("replacing {}", path.display()))?;
            }
            Write::Remove(name) => match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {name}")),
            },
        }
    }
    Ok(())
}

/// `pilot rotate-root <step>` on the state folder: what was done, for the operator.
pub fn rotate_folder(dir: &Path, trust_domain: &str, step: Step) -> anyhow::Result<String> {
    let stored = read_folder(dir, &FOLDER)?;
    anyhow::ensure!(
        stored.contains_key(FOLDER.cert),
        "no root in {} (pilot creates it on its first start)",
        dir.display()
    );
    let writes = plan(step, &stored, &FOLDER, || {
        Ok(DevCa::generate(trust_domain)?)
    })?;
    write_folder(dir, &writes)?;
    let roots = load(
        &read_folder(dir, &FOLDER)?,
        &FOLDER,
        &dir.display().to_string(),
    )?;
    Ok(format!(
        "{step:?} done: {} root(s) trusted in {}; wait at least one certificate lifetime before the next step",
        roots.count(),
        dir.display()
    ))
}

/// How often the folder is read for a rotation step.
pub const FOLDER_POLL: Duration = Duration::from_secs(2);
/// How often the Secret is read for a rotation step (one GET).
pub const SECRET_POLL: Duration = Duration::from_secs(10);

/// Keep `tx` at the roots of the store `read` returns, read every `every`; a store that does
/// not load (a step half-written, a bad file) is reported once and the last good roots stay.
pub async fn watch_store<F>(
    every: Duration,
    names: Names,
    origin: String,
    read: F,
    tx: watch::Sender<Arc<Roots>>,
) where
    F: AsyncFnMut() -> anyhow::Result<Stored>,
{
    let mut read = read;
    let mut last: Option<Stored> = None;
    loop {
        tokio::time::sleep(every).await;
        let stored = match read().await {
            Ok(s) => s,
            Err(e) => {
                warn!("reading the CA roots from {origin}: {e:#}");
                continue;
            }
        };
        if last.as_ref() == Some(&stored) {
            continue;
        }
        let (o, s) = (origin.clone(), stored.clone());
        let loaded = tokio::task::spawn_blocking(move || load(&s, &names, &o)).await;
        last = Some(stored);
        match loaded {
            Ok(Ok(roots)) => {
                let signing_changed = tx.borrow().signing.root() != roots.signing.root();
                let count = roots.count();
                if tx.borrow().bundle_pem() != roots.bundle_pem() || signing_changed {
                    info!(%origin, trusted = count, signing_changed, "CA roots changed");
                    tx.send_replace(Arc::new(roots));
                }
            }
            Ok(Err(e)) => warn!("the CA roots in {origin} do not load, the last good stay: {e:#}"),
            Err(e) => warn!("loading the CA roots panicked: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(stored: &mut Stored, writes: &[Write]) {
        for w in writes {
            match w {
                Write::Put(n, t) => {
                    stored.insert(n.to_string(), t.clone());
                }
                Write::Remove(n) => {
                    stored.remove(*n);
                }
            }
        }
    }

    fn trusted_ders(stored: &Stored) -> Option<Vec<CertificateDer<'static>>> {
        let roots = load(stored, &FOLDER, "test").ok()?;
        Some(
            certificates(roots.bundle_pem())
                .unwrap()
                .into_iter()
                .map(|(_, d)| d)
                .collect(),
        )
    }

    #[test]
    fn a_rotation_never_drops_a_root_in_use() {
        let first = DevCa::generate("cluster.local").unwrap();
        let mut stored = Stored::new();
        stored.insert(FOLDER.cert.into(), first.root_pem().into());
        stored.insert(FOLDER.key.into(), first.key_pem());
        assert_eq!(trusted_ders(&stored).unwrap(), vec![first.root().clone()]);

        let next = DevCa::generate("cluster.local").unwrap();
        let next_root = next.root().clone();
        let mut next = Some(next);
        let mut previous_trust = vec![first.root().clone()];
        for step in [Step::Prepare, Step::Activate, Step::Finish] {
            let writes = plan(step, &stored, &FOLDER, || Ok(next.take().unwrap())).unwrap();
            let before = previous_trust.clone();
            // Every state between two writes: whatever loads trusts everything in use before
            // and after the step (a state that does not load keeps the last good roots).
            let mut after = stored.clone();
            apply(&mut after, &writes);
            let after_trust = trusted_ders(&after).unwrap();
            for i in 0..=writes.len() {
                let mut mid = stored.clone();
                apply(&mut mid, &writes[..i]);
                if let Some(t) = trusted_ders(&mid) {
                    for r in before.iter().filter(|r| after_trust.contains(r)) {
                        assert!(t.contains(r), "{step:?} after {i} writes drops a root");
                    }
                }
            }
            stored = after;
            previous_trust = after_trust;
            let roots = load(&stored, &FOLDER, "test").unwrap();
            match step {
                Step::Prepare => {
                    assert_eq!(roots.signing.root(), first.root());
                    assert_eq!(
                        previous_trust,
                        vec![first.root().clone(), next_root.clone()]
                    );
                }
                Step::Activate => {
                    assert_eq!(roots.signing.root(), &next_root);
                    assert_eq!(
                        previous_trust,
                        vec![next_root.clone(), first.root().clone()]
                    );
                    assert!(!stored.contains_key(FOLDER.next_cert));
                }
                Step::Finish => {
                    assert_eq!(previous_trust, vec![next_root.clone()]);
                }
            }
        }
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let mut stored = Stored::new();
        stored.insert(FOLDER.cert.into(), ca.root_pem().into());
        stored.insert(FOLDER.key.into(), ca.key_pem());
        let gen_ = || Ok(DevCa::generate("cluster.local")?);
        let err = |s: Step, st: &Stored| plan(s, st, &FOLDER, gen_).unwrap_err().to_string();
        assert!(err(Step::Activate, &stored).contains("run prepare first"));
        assert!(err(Step::Finish, &stored).contains("no rotation to finish"));
        let w = plan(Step::Prepare, &stored, &FOLDER, gen_).unwrap();
        apply(&mut stored, &w);
        assert!(err(Step::Prepare, &stored).contains("already prepared"));
        assert!(err(Step::Finish, &stored).contains("activate it first"));
    }

    #[test]
    fn a_bad_trusted_file_is_named() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let mut stored = Stored::new();
        stored.insert(FOLDER.cert.into(), ca.root_pem().into());
        stored.insert(FOLDER.key.into(), ca.key_pem());
        stored.insert(FOLDER.trusted.into(), "garbage".into());
        let e = format!(
            "{:#}",
            load(&stored, &FOLDER, "/var/lib/pilot").unwrap_err()
        );
        assert!(e.contains("/var/lib/pilot trusted-roots.pem"), "{e}");
    }

    #[test]
    fn the_folder_round_trips() {
        let dir = std::env::temp_dir().join(format!("pilot-roots-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::generate("cluster.local").unwrap();
        ca.save(&dir.join(FOLDER.cert), &dir.join(FOLDER.key))
            .unwrap();
        let said = rotate_folder(&dir, "cluster.local", Step::Prepare).unwrap();
        assert!(said.contains("2 root(s)"), "{said}");
        rotate_folder(&dir, "cluster.local", Step::Activate).unwrap();
        let roots = load(&read_folder(&dir, &FOLDER).unwrap(), &FOLDER, "d").unwrap();
        assert_ne!(roots.signing.root(), ca.root());
        assert_eq!(roots.count(), 2);
        let said = rotate_folder(&dir, "cluster.local", Step::Finish).unwrap();
        assert!(said.contains("1 root(s)"), "{said}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
