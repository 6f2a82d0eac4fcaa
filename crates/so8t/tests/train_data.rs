//! The committed training set is what `scripts/data/build_safety_set.py` makes from the
//! raw data, byte for byte, and its splits share no near duplicates.

mod common;

use so8t::artifact::adapter::Labels;
use so8t::train::data::{read_jsonl, Dataset, Example};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    common::fixtures().join("..")
}

fn raw_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SO8T_SAFETY_RAW")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data/safety/raw"));
    dir.join("SOURCES.md").exists().then_some(dir)
}

#[test]
fn build_script_reproduces_the_committed_set() {
    let Some(raw) = raw_dir() else {
        eprintln!("SKIPPED: the raw safety data is not here (../shared/data/safety/raw or $SO8T_SAFETY_RAW)");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(repo().join("scripts/data/build_safety_set.py"))
        .arg(&raw)
        .arg(out.path())
        .output();
    let output = match status {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: python3 cannot run here ({e})");
            return;
        }
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "test_families.jsonl",
        "train_multi_turn.jsonl",
        "val_multi_turn.jsonl",
        "test_families_multi_turn.jsonl",
        "stats.json",
    ] {
        let made = std::fs::read(out.path().join(name)).unwrap();
        let committed = std::fs::read(repo().join("data/safety").join(name)).unwrap();
        assert!(
            made == committed,
            "data/safety/{name} differs from what the script builds"
        );
    }
}

/// A committed file of `data/safety`, read as `so8t train` reads it.
fn read(name: &str) -> Dataset {
    read_jsonl(&repo().join("data/safety").join(name), &Labels::default(), false).unwrap()
}

fn shingles(text: &str) -> HashSet<String> {
    let w: Vec<String> = text
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if w.len() < 3 {
        return [w.join(" ")].into_iter().collect();
    }
    let mut s: HashSet<String> = w.windows(3).map(|x| x.join(" ")).collect();
    s.extend(w.iter().cloned());
    s
}

/// Every validation and test row against every training row, exactly (no MinHash): the
/// closest pair must stay under the script's near-duplicate bound of Jaccard 0.5, and no
/// prompt may appear in two splits.
#[test]
fn splits_share_no_near_duplicates() {
    let train = read("train.jsonl");
    // Shingle → training rows that have it, so each row is compared with the training
    // rows it shares anything with (exactly; the others have Jaccard 0).
    let mut index: std::collections::HashMap<String, Vec<usize>> = Default::default();
    let train_sizes: Vec<usize> = train
        .examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let s = shingles(e.user_text());
            for x in &s {
                index.entry(x.clone()).or_default().push(i);
            }
            s.len()
        })
        .collect();
    for split in ["val.jsonl", "test.jsonl", "test_families.jsonl"] {
        let d = read(split);
        assert!(d.examples.len() > 400, "{split}: {} rows", d.examples.len());
        for e in &d.examples {
            let s = shingles(e.user_text());
            let mut shared: std::collections::HashMap<usize, usize> = Default::default();
            for x in &s {
                for &i in index.get(x).map_or(&[][..], |v| v.as_slice()) {
                    *shared.entry(i).or_default() += 1;
                }
            }
            for (i, inter) in shared {
                let j = inter as f64 / (s.len() + train_sizes[i] - inter) as f64;
                assert!(j < 0.5, "{split} line {} and train line {} are near duplicates (Jaccard {j:.2}): {:?} / {:?}", e.line, train.examples[i].line, e.user_text(), train.examples[i].user_text());
            }
        }
    }
    // Both labels of both heads are present in every split (escalation has fewer rows
    // since Banking77 became a held-out family).
    for split in ["train.jsonl", "val.jsonl", "test.jsonl", "test_families.jsonl"] {
        let d = read(split);
        for head in 0..2 {
            let labels: Vec<bool> = d.examples.iter().filter_map(|e| e.label(head)).collect();
            assert!(
                labels.iter().filter(|&&v| v).count() > 30
                    && labels.iter().filter(|&&v| !v).count() > 30,
                "{split} head {head}"
            );
        }
    }
    // Held-out families are nowhere else.
    let families: HashSet<String> = read("test_families.jsonl")
        .examples
        .iter()
        .map(|e| e.group().to_string())
        .collect();
    for split in ["train.jsonl", "val.jsonl", "test.jsonl"] {
        for e in &read(split).examples {
            assert!(!families.contains(e.group()), "{split} line {} is of held-out family {}", e.line, e.group());
        }
    }
}

/// The conversation files are rows of their split after one or two benign turns: each
/// conversation's last message is a row of that split with the same labels and answer, the
/// turns before it alternate user and assistant, and the held-out families' earlier turns
/// come from test.jsonl, so no conversation scored as a test holds a row anything was
/// fitted on.
#[test]
fn multi_turn_rows_are_their_split_after_benign_turns() {
    let key = |e: &Example| {
        (
            e.user_text().to_string(),
            e.response.clone(),
            e.safety,
            e.authority,
            e.response_safety,
            e.family.clone(),
        )
    };
    let train_prompts: HashSet<String> = read("train.jsonl")
        .examples
        .iter()
        .map(|e| e.user_text().to_string())
        .collect();
    for (file, rows_from, histories_from, whole) in [
        ("train_multi_turn.jsonl", "train.jsonl", "train.jsonl", false),
        ("val_multi_turn.jsonl", "val.jsonl", "val.jsonl", true),
        ("test_families_multi_turn.jsonl", "test_families.jsonl", "test.jsonl", true),
    ] {
        let source: HashSet<_> = read(rows_from).examples.iter().map(key).collect();
        let histories: HashSet<String> = read(histories_from)
            .examples
            .iter()
            .map(|e| e.user_text().to_string())
            .collect();
        let d = read(file);
        assert!(
            if whole { d.examples.len() == source.len() } else { d.examples.len() * 10 > source.len() },
            "{file}: {} rows from {} in {rows_from}",
            d.examples.len(),
            source.len()
        );
        for e in &d.examples {
            assert!(source.contains(&key(e)), "{file} line {}: last turn is no row of {rows_from}", e.line);
            let n = e.messages.len();
            assert!(n == 3 || n == 5, "{file} line {}: {n} messages", e.line);
            for (i, m) in e.messages.iter().enumerate() {
                assert_eq!(m.role, if i % 2 == 0 { "user" } else { "assistant" }, "{file} line {}", e.line);
                if i % 2 == 0 && i + 1 < n {
                    assert!(histories.contains(&m.content), "{file} line {}: turn {i} is not from {histories_from}", e.line);
                    if histories_from != "train.jsonl" {
                        assert!(!train_prompts.contains(&m.content), "{file} line {}: turn {i} is a training row", e.line);
                    }
                }
            }
        }
    }
}
