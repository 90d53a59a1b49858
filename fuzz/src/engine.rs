//! The mutation engine: a corpus seeded by each target, byte-level and dictionary mutations,
//! and feedback from the features a target reports for each input (which error, which branch
//! of the decoder, which shapes of output): an input that shows a new feature joins the
//! corpus. It needs no compiler instrumentation, so it runs on the stable toolchain in the
//! workspace's normal build, offline; a panic (a failed invariant included) is a crash, saved
//! to a file that `--input` replays.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    /// Valid inputs to start from (mutations of valid inputs go deeper than random bytes).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator inserts whole (keywords, field tags, magic values).
    pub dictionary: &'static [&'static [u8]],
    /// Inputs are cut to this length.
    pub max_len: usize,
    /// Runs one input: panics when an invariant fails; reports what it saw into `Features`.
    pub run: fn(&[u8], &mut Features),
}

/// What one input exercised, as hashes: the engine keeps inputs that add one.
#[derive(Default)]
pub struct Features(Vec<u64>);

impl Features {
    pub fn add(&mut self, feature: impl Hash) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        feature.hash(&mut h);
        self.0.push(h.finish());
    }
}

/// The shape of an error message as a feature: its first few lower-case words, so that
/// "unknown scope 7" and "unknown scope 9", or the same error at another line, count once.
pub fn shape(message: &str) -> String {
    let mut out = String::new();
    let before_values = message
        .split(['"', '\'', '`', ':'])
        .next()
        .unwrap_or_default();
    for word in before_values
        .split_whitespace()
        .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        .take(4)
    {
        out.push_str(word);
        out.push(' ');
    }
    out
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub executions: u64,
    pub corpus: usize,
    pub features: usize,
    pub elapsed: Duration,
    /// The panic message and the file holding the input.
    pub crash: Option<(String, PathBuf)>,
}

/// Run `target` for `duration` (or until the first crash), crashes saved under `out`.
pub fn fuzz(target: &Target, duration: Duration, seed: u64, out: &Path) -> Report {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let message = capture_panics();
    let mut seen = HashSet::new();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut executions = 0u64;
    let mut crash = None;
    let mut inputs = (target.seeds)();
    inputs.push(Vec::new());
    let mut fresh = inputs.into_iter();
    while started.elapsed() < duration {
        let input = match fresh.next() {
            Some(seed_input) => seed_input,
            None => mutate(target, &corpus, &mut rng),
        };
        executions += 1;
        let mut features = Features::default();
        let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&input, &mut features)));
        if result.is_err() {
            let text = message
                .lock()
                .map(|m| m.clone())
                .unwrap_or_else(|_| "panic".into());
            crash = Some((text, save(out, target.name, &input)));
            break;
        }
        let mut new = false;
        for f in features.0 {
            new |= seen.insert(f);
        }
        if new || corpus.is_empty() {
            corpus.push(input);
        }
    }
    let _ = std::panic::take_hook();
    Report {
        target: target.name,
        executions,
        corpus: corpus.len(),
        features: seen.len(),
        elapsed: started.elapsed(),
        crash,
    }
}

/// Run one saved input (a crash file) with the default panic output.
pub fn replay(target: &Target, input: &[u8]) {
    let mut features = Features::default();
    (target.run)(input, &mut features);
}

/// Panics are expected here (each is a finding): keep the message for the report and keep
/// the terminal quiet.
fn capture_panics() -> Arc<Mutex<String>> {
    let message = Arc::new(Mutex::new(String::new()));
    let sink = message.clone();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut m) = sink.lock() {
            *m = info.to_string();
        }
    }));
    message
}

fn save(out: &Path, target: &str, input: &[u8]) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let dir = out.join(target);
    let path = dir.join(format!("crash-{:016x}", h.finish()));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input)) {
        eprintln!("cannot save the crashing input to {}: {e}", path.display());
    }
    path
}

/// A corpus entry changed by one to four mutations.
fn mutate(target: &Target, corpus: &[Vec<u8>], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut data = corpus[rng.usize(..corpus.len())].clone();
    for _ in 0..rng.usize(1..=4) {
        mutate_once(target, corpus, rng, &mut data);
    }
    data.truncate(target.max_len);
    data
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

fn mutate_once(target: &Target, corpus: &[Vec<u8>], rng: &mut fastrand::Rng, data: &mut Vec<u8>) {
    match rng.u8(..10) {
        // Flip one bit.
        0 if !data.is_empty() => {
            let i = rng.usize(..data.len());
            data[i] ^= 1 << rng.u8(..8);
        }
        // A random byte.
        1 if !data.is_empty() => {
            let i = rng.usize(..data.len());
            data[i] = rng.u8(..);
        }
        // Delete a range.
        2 if !data.is_empty() => {
            let start = rng.usize(..data.len());
            let end = (start + rng.usize(1..=16)).min(data.len());
            data.drain(start..end);
        }
        // Insert random bytes.
        3 => {
            let at = rng.usize(..=data.len());
            let bytes: Vec<u8> = (0..rng.usize(1..=8)).map(|_| rng.u8(..)).collect();
            data.splice(at..at, bytes);
        }
        // Duplicate a range (repeated fields, nested structures).
        4 if !data.is_empty() => {
            let start = rng.usize(..data.len());
            let end = (start + rng.usize(1..=64)).min(data.len());
            let copy = data[start..end].to_vec();
            let at = rng.usize(..=data.len());
            data.splice(at..at, copy);
        }
        // Insert or overwrite with a dictionary token.
        5 | 6 if !target.dictionary.is_empty() => {
            let token = target.dictionary[rng.usize(..target.dictionary.len())];
            let at = rng.usize(..=data.len());
            if rng.bool() {
                data.splice(at..at, token.iter().copied());
            } else {
                let end = (at + token.len()).min(data.len());
                data.splice(at..end, token.iter().copied());
            }
        }
        // An interesting integer, 1, 2, 4 or 8 bytes, either byte order.
        7 if !data.is_empty() => {
            let value = INTERESTING[rng.usize(..INTERESTING.len())];
            let width = [1, 2, 4, 8][rng.usize(..4)];
            let bytes = if rng.bool() {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            let bytes = if rng.bool() {
                &bytes[8 - width..]
            } else {
                &bytes[..width]
            };
            let at = rng.usize(..data.len());
            let end = (at + width).min(data.len());
            data.splice(at..end, bytes.iter().copied());
        }
        // Splice with another corpus entry.
        8 => {
            let other = &corpus[rng.usize(..corpus.len())];
            let cut = rng.usize(..=data.len());
            let from = rng.usize(..=other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Truncate.
        _ if !data.is_empty() => data.truncate(rng.usize(..data.len())),
        _ => data.push(rng.u8(..)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finds_magic(data: &[u8], f: &mut Features) {
        // Each matching prefix byte is a feature, as a branch would be to a coverage tool.
        let magic = b"MESH";
        let matched = data.iter().zip(magic).take_while(|(a, b)| a == b).count();
        f.add(matched);
        assert!(matched < magic.len(), "found the magic");
    }

    #[test]
    fn feedback_finds_a_four_byte_magic_and_saves_it() {
        let target = Target {
            name: "magic",
            about: "test",
            seeds: || vec![b"xxxx".to_vec()],
            dictionary: &[],
            max_len: 64,
            run: finds_magic,
        };
        let dir = std::env::temp_dir().join(format!("fuzz-engine-{}", std::process::id()));
        let report = fuzz(&target, Duration::from_secs(20), 1, &dir);
        let (message, path) = report.crash.expect("the magic is found within 20 s");
        assert!(message.contains("found the magic"), "{message}");
        assert!(std::fs::read(&path).unwrap().starts_with(b"MESH"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
