//! The fuzz targets (so8t::fuzz, so8t_serve::api::fuzz_request) in every test run: each
//! seed (fuzz/seeds, from scripts/fuzz/make-seeds.py) and each regression input
//! (fuzz/regressions: inputs that once crashed a target) must return without a panic,
//! then each target gets a few seconds of seeded random mutations of its seeds (bit and
//! byte flips, boundary integers over 4- and 8-byte fields, cut, duplicated and spliced
//! chunks). Coverage-guided runs are `scripts/fuzz/run.sh` (FUZZING.md); this is the
//! bounded share that CI runs on a fresh machine without building libFuzzer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// xorshift64*: a fixed sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    2,
    3,
    0x7f,
    0xffff_ffff,
    0x8000_0000,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'<', b'\n'][rng.below(8)];
            }
            2 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                if rng.below(2) == 0 {
                    b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                } else {
                    b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                }
            }
            3 if len > 0 => b.truncate(rng.below(len)),
            4 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below((len - i).min(4096)) + 1;
                let chunk = b[i..i + n].to_vec();
                let at = rng.below(len);
                b.splice(at..at, chunk);
            }
            5 if len > 1 => {
                let i = rng.below(len);
                let n = rng.below(len - i) + 1;
                b.drain(i..i + n.min(len - i));
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())].1;
                if !other.is_empty() && len > 0 {
                    let (i, j) = (rng.below(len), rng.below(other.len()));
                    b.truncate(i);
                    b.extend_from_slice(&other[j..]);
                }
            }
        }
    }
    b
}

#[test]
fn fuzz_targets_survive_their_corpora_and_mutations() {
    let mut targets: Vec<(&str, so8t::fuzz::Target)> = so8t::fuzz::TARGETS.to_vec();
    targets.push(("request", so8t_serve::api::fuzz_request));
    let failures_dir = root().join("target/fuzz-failures");
    let mut failures = Vec::new();
    let budget = Duration::from_secs(3);
    for (name, target) in targets {
        let seeds = inputs(&root().join("fuzz/seeds").join(name));
        assert!(!seeds.is_empty(), "no seeds for {name}: run scripts/fuzz/make-seeds.py");
        let regressions = inputs(&root().join("fuzz/regressions").join(name));
        let mut run = |label: String, data: &[u8]| {
            if catch_unwind(AssertUnwindSafe(|| target(data))).is_err() {
                std::fs::create_dir_all(&failures_dir).unwrap();
                let path = failures_dir.join(format!("{name}-{}", failures.len()));
                std::fs::write(&path, data).unwrap();
                failures.push(format!("{name}: {label} panicked (input saved as {})", path.display()));
            }
        };
        for (label, data) in seeds.iter().chain(&regressions) {
            run(label.clone(), data);
        }
        let mut rng = Rng(0x5eed_0000 + name.len() as u64);
        let started = Instant::now();
        let mut execs = 0;
        while started.elapsed() < budget {
            let data = mutate(&mut rng, &seeds);
            run(format!("mutation #{execs}"), &data);
            execs += 1;
        }
        eprintln!("{name}: {} seeds, {} regressions, {execs} mutations", seeds.len(), regressions.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
