//! The folder source: a directory of multi-document Kubernetes YAML, watched, each change debounced into one new snapshot.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::k8s::{Object, Origin, Parsed, Problem, parse_documents};
use crate::model::Snapshot;

/// How often the folder is looked at. Polling a directory's metadata is cheap and behaves the
/// same on every filesystem (bind mounts, ConfigMap symlink swaps), unlike inotify.
pub const POLL: Duration = Duration::from_millis(50);
/// Changes closer together than this become one snapshot (an editor's or `cp`'s several writes).
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Read every `*.yaml` / `*.yml` under `dir` (recursively, in path order) into a snapshot.
/// Problems in one object never keep the others out. A `dir` that is a file is read as the
/// folder's only file, whatever its name.
pub fn load(dir: &Path) -> Snapshot {
    ParseCache::default().load(dir)
}

/// Each file's parse, kept while the file's modification time and length stay the same, so
/// that a change re-reads and re-parses only the files that changed (at 100k pods, parsing
/// is most of what a change costs).
#[derive(Debug, Default)]
pub struct ParseCache {
    files: HashMap<PathBuf, (Option<SystemTime>, u64, Arc<Parsed>)>,
    /// Files parsed by the last `load` (the rest came from the cache).
    pub parsed_last: usize,
    /// The last `update` applied the change to the previous snapshot (a change of pods).
    pub updated_last: bool,
    /// The cache has read the folder before: what it holds is what the last snapshot was
    /// built from.
    loaded: bool,
}

impl ParseCache {
    /// As [`load`], parsing only the files new or changed since the last call.
    pub fn load(&mut self, dir: &Path) -> Snapshot {
        self.update(dir, None)
    }

    /// As [`ParseCache::load`]; given `previous`, the snapshot of the files as this cache
    /// last read them (ignored by a cache that has not read them yet), a change of pods alone is applied to it
    /// ([`Snapshot::with_changed_pods`]) rather than every object being assembled again
    /// (at 100k pods, most of what one pod's change cost).
    pub fn update(&mut self, dir: &Path, previous: Option<&Snapshot>) -> Snapshot {
        let mut problems = Vec::new();
        let mut present = HashSet::new();
        // Every file's parse in path order, and the parses it replaces.
        let mut now: Vec<Arc<Parsed>> = Vec::new();
        let mut replaced: Vec<Arc<Parsed>> = Vec::new();
        let mut changed: Vec<Arc<Parsed>> = Vec::new();
        self.parsed_last = 0;
        self.updated_last = false;
        for path in yaml_files(dir) {
            let name = match path.strip_prefix(dir) {
                Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
                // `dir` is the file itself: problems name it as given.
                _ => path.display().to_string(),
            };
            let meta = std::fs::metadata(&path).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            let cached = self
                .files
                .get(&path)
                .filter(|(m, l, _)| *m == mtime && *l == len)
                .map(|(_, _, p)| p.clone());
            let parsed = match cached {
                Some(p) => p,
                None => match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        self.parsed_last += 1;
                        let p = Arc::new(parse_documents(&text, &name));
                        if let Some((_, _, old)) =
                            self.files.insert(path.clone(), (mtime, len, p.clone()))
                        {
                            replaced.push(old);
                        }
                        changed.push(p.clone());
                        p
                    }
                    Err(e) => {
                        if let Some((_, _, old)) = self.files.remove(&path) {
                            replaced.push(old);
                        }
                        problems.push(Problem {
                            file: name,
                            object: String::new(),
                            field: String::new(),
                            reason: format!("cannot read: {e}"),
                        });
                        continue;
                    }
                },
            };
            problems.extend(parsed.problems.iter().cloned());
            now.push(parsed);
            present.insert(path);
        }
        self.files.retain(|p, (_, _, parsed)| {
            let keep = present.contains(p);
            if !keep {
                replaced.push(parsed.clone());
            }
            keep
        });
        let loaded = std::mem::replace(&mut self.loaded, true);
        if let Some(previous) = previous.filter(|_| loaded) {
            let before: Vec<&(Origin, Object)> =
                replaced.iter().flat_map(|p| p.objects.iter()).collect();
            let after: Vec<&(Origin, Object)> =
                changed.iter().flat_map(|p| p.objects.iter()).collect();
            if let Some(s) = previous.with_changed_pods(&before, &after, problems.clone()) {
                self.updated_last = true;
                return s;
            }
        }
        let objects = now.iter().flat_map(|p| p.objects.iter().cloned()).collect();
        Snapshot::build(objects, problems)
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                // Editors' swap files and ConfigMap mounts' `..data` staging directories.
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// What identifies the folder's content without reading it.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// Take this before `load`, and hand it to `watch_folder`, so no change slips between them.
pub fn fingerprint(dir: &Path) -> Fingerprint {
    yaml_files(dir)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let mtime = m.as_ref().and_then(|m| m.modified().ok());
            let len = m.map(|m| m.len()).unwrap_or(0);
            (p, mtime, len)
        })
        .collect()
}

/// Run `f` on `dir` on a blocking thread: reading and parsing files must not hold an async
/// worker back. Fails only if `f` panicked.
pub async fn blocking<T: Send + 'static>(
    dir: &Path,
    f: impl FnOnce(&Path) -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || f(&dir)).await
}

/// Publish a new snapshot of `dir` after every (debounced) change since `last`, until the
/// receivers are gone; `cache` holds the parses of the files as they were at `last`.
pub async fn watch_folder(
    dir: PathBuf,
    mut last: Fingerprint,
    mut cache: ParseCache,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    let mut generation = tx.borrow().generation;
    loop {
        tokio::time::sleep(POLL).await;
        if tx.is_closed() {
            return;
        }
        let Some(now) = or_log(blocking(&dir, fingerprint).await) else {
            continue;
        };
        if now == last {
            continue;
        }
        // Wait for the writes to settle.
        let mut settled = now;
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            let Some(again) = or_log(blocking(&dir, fingerprint).await) else {
                continue;
            };
            if again == settled {
                break;
            }
            settled = again;
        }
        let mut taken = std::mem::take(&mut cache);
        let reading = std::time::Instant::now();
        // What the cache read last: with no problems in it, what was published is exactly
        // that (no last good version was kept), so a change of pods applies to it.
        let previous = tx.borrow().clone();
        let Some((mut snap, parsed)) = or_log(
            blocking(&dir, move |d| {
                let snap = taken.update(d, Some(&previous));
                (snap, taken)
            })
            .await,
        ) else {
            // The cache went with the panicked task: the next change parses everything.
            continue;
        };
        cache = parsed;
        last = settled;
        snap.keep_last_good(&tx.borrow());
        generation += 1;
        snap.generation = generation;
        for p in &snap.problems {
            warn!("{p}");
        }
        info!(
            generation,
            pods = snap.pods.len(),
            services = snap.services.len(),
            policies = snap.policies.len(),
            problems = snap.problems.len(),
            files_parsed = cache.parsed_last,
            updated = cache.updated_last,
            took = ?reading.elapsed(),
            "configuration folder changed"
        );
        tx.send_replace(Arc::new(snap));
    }
}

/// The result of a blocking read, or `None` after logging why there is none (a panic while
/// reading: the folder is read again at the next poll).
fn or_log<T>(r: Result<T, tokio::task::JoinError>) -> Option<T> {
    r.map_err(|e| warn!("reading the configuration folder failed: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_changes() {
        let dir = std::env::temp_dir().join(format!("pilot-folder-{}", fastrand::u64(..)));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        let fp = fingerprint(&dir);
        let mut cache = ParseCache::default();
        let first = cache.load(&dir);
        assert_eq!(first.pods.len(), 1);
        assert_eq!(cache.parsed_last, 1);
        let (tx, mut rx) = watch::channel(Arc::new(first));
        rx.borrow_and_update();
        let task = tokio::spawn(watch_folder(dir.clone(), fp, cache, tx));
        std::fs::write(
            dir.join("sub/b.yml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: B}\n",
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let snap = rx.borrow().clone();
        assert_eq!(snap.generation, 1);
        assert_eq!(snap.pods.len(), 2);
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        assert_eq!(snap.problems[0].file, "sub/b.yml");
        assert_eq!(snap.problems[0].object, "Pod default/B");
        task.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_is_a_folder_of_one() {
        let dir = std::env::temp_dir().join(format!("pilot-folder-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        // Any name: the file is what was given.
        let file = dir.join("mesh.conf");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: A}\n",
        )
        .unwrap();
        let snap = load(&file);
        assert_eq!(snap.pods.len(), 1);
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        assert_eq!(snap.problems[0].file, file.display().to_string());
        assert_eq!(fingerprint(&file).len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_bad_edit_keeps_the_last_good_version() {
        let dir = std::env::temp_dir().join(format!("pilot-folder-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let vs = |uri: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: shop}}\nspec: {{hosts: [r], http: [{{match: [{{uri: {{regex: {uri:?}}}}}], route: [{{destination: {{host: r}}}}]}}]}}\n"
            )
        };
        std::fs::write(dir.join("vs.yaml"), vs("/good.*")).unwrap();
        let fp = fingerprint(&dir);
        let (tx, mut rx) = watch::channel(Arc::new(load(&dir)));
        rx.borrow_and_update();
        let task = tokio::spawn(watch_folder(dir.clone(), fp, ParseCache::default(), tx));
        let key = ("shop".to_string(), "r".to_string());

        // Invalid now: the valid version stays, and the problem says so.
        std::fs::write(dir.join("vs.yaml"), vs("(")).unwrap();
        let snap = next(&mut rx).await;
        let kept = &snap.virtual_services[&key];
        assert!(format!("{kept:?}").contains("/good.*"), "{kept:?}");
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        let p = snap.problems[0].to_string();
        assert!(
            p.starts_with("vs.yaml: VirtualService shop/r: field \"spec.http[0].match[0].uri.regex\": invalid regex")
                && p.ends_with("; the last good version stays"),
            "{p}"
        );
        assert_eq!(snap.file_of("VirtualService", &key), "vs.yaml");

        // Still invalid after another change elsewhere: still the same last good version.
        std::fs::write(
            dir.join("pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
        )
        .unwrap();
        let snap = next(&mut rx).await;
        assert!(format!("{:?}", snap.virtual_services[&key]).contains("/good.*"));
        assert!(
            snap.problems[0]
                .reason
                .ends_with("; the last good version stays")
        );

        // Deleted: gone, no problem.
        std::fs::remove_file(dir.join("vs.yaml")).unwrap();
        let snap = next(&mut rx).await;
        assert!(snap.virtual_services.is_empty());
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);

        // An object that was never valid is simply left out.
        std::fs::write(dir.join("vs.yaml"), vs("(")).unwrap();
        let snap = next(&mut rx).await;
        assert!(snap.virtual_services.is_empty());
        assert!(!snap.problems[0].reason.contains("last good"));
        task.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_changed_files_are_parsed_again() {
        let dir = std::env::temp_dir().join(format!("pilot-folder-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let pod = |name: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\n");
        for i in 0..5 {
            std::fs::write(dir.join(format!("p{i}.yaml")), pod(&format!("p{i}"))).unwrap();
        }
        let mut cache = ParseCache::default();
        assert_eq!(cache.load(&dir).pods.len(), 5);
        assert_eq!(cache.parsed_last, 5);
        assert_eq!(cache.load(&dir).pods.len(), 5);
        assert_eq!(cache.parsed_last, 0, "nothing changed");
        std::fs::write(dir.join("p2.yaml"), pod("renamed-longer")).unwrap();
        std::fs::remove_file(dir.join("p4.yaml")).unwrap();
        let snap = cache.load(&dir);
        assert_eq!(cache.parsed_last, 1);
        let mut names: Vec<&str> = snap.pods.values().map(|p| p.meta.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["p0", "p1", "p3", "renamed-longer"]);
        // The result is the same as a full read.
        assert_eq!(format!("{:?}", snap.pods), format!("{:?}", load(&dir).pods));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Random edits of a folder (pods changed, added, removed, renamed, moved between files,
    /// defined twice, made invalid; files deleted; a Service put among pods): the snapshot
    /// updated from the previous one equals the one read afresh, every time.
    #[test]
    fn updated_snapshots_equal_full_reads() {
        let dir = std::env::temp_dir().join(format!("pilot-folder-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut stamp = 0u64;
        let pod = |rng: &mut fastrand::Rng, n: u32| {
            let ip = if rng.u8(..40) == 0 {
                // Invalid: a problem, and (in a later snapshot) a last good version.
                "not-an-ip".to_string()
            } else {
                format!("10.1.{}.{}", n / 200, n % 200)
            };
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{n}, namespace: ns{}, labels: {{v: x{}}}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: {ip}}}\n",
                n % 3,
                rng.u8(..4)
            )
        };
        let mut write = |rng: &mut fastrand::Rng, file: usize| {
            let mut text = String::new();
            for _ in 0..rng.usize(0..6) {
                let n = rng.u32(..2000);
                text += &pod(rng, n);
            }
            if rng.u8(..8) == 0 {
                text += "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns0}\nspec: {ports: [{port: 80}]}\n";
            }
            let path = dir.join(format!("f{file}.yaml"));
            std::fs::write(&path, text).unwrap();
            // A distinct modification time each write: the cache must see every change.
            stamp += 1;
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + stamp);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        for f in 0..5 {
            write(&mut rng, f);
        }
        let mut cache = ParseCache::default();
        let mut previous = cache.load(&dir);
        let mut incremental = 0;
        for step in 0..300 {
            for _ in 0..rng.usize(1..3) {
                let f = rng.usize(..6);
                if rng.u8(..10) == 0 {
                    let _ = std::fs::remove_file(dir.join(format!("f{f}.yaml")));
                } else {
                    write(&mut rng, f);
                }
            }
            let full = load(&dir);
            let mut updated = cache.update(&dir, Some(&previous));
            incremental += usize::from(cache.updated_last);
            updated.generation = full.generation;
            assert_eq!(format!("{updated:?}"), format!("{full:?}"), "step {step}");
            previous = updated;
        }
        assert!(
            incremental > 50,
            "only {incremental} updates applied to the previous"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    async fn next(rx: &mut watch::Receiver<Arc<Snapshot>>) -> Arc<Snapshot> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        rx.borrow_and_update().clone()
    }
}
