#!/usr/bin/env python3
"""Builds the SO8T safety/authority training set from the raw public datasets.

    python3 scripts/data/build_safety_set.py [RAW_DIR] [OUT_DIR]

RAW_DIR defaults to ../shared/data/safety/raw (see its SOURCES.md for licences), OUT_DIR
to data/safety. Writes train.jsonl, val.jsonl, test.jsonl and stats.json. Standard
library only, and deterministic: the same raw files give the same bytes (tested by
crates/so8t/tests/train_data.rs). The label mapping and its reasons are in
data/safety/MAPPING.md; the code below is that table.
"""

import csv
import hashlib
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261122
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# Per-source caps keep the set balanced and small enough for heads training on CPU.
CAPS = {
    "alpaca": 1000,
    "bitext_benign": 400,
    "banking77_benign": 500,
    "bitext_escalate": 500,
    "banking77_escalate": 600,
}
BITEXT_ESCALATE = {"contact_human_agent", "complaint", "delete_account"}
# Ambiguous between "give the phone number" (handle) and "get me a person" (escalate).
BITEXT_EXCLUDE = {"contact_customer_service"}
BANKING_ESCALATE = {
    "compromised_card",
    "lost_or_stolen_card",
    "lost_or_stolen_phone",
    "terminate_account",
    "unable_to_verify_identity",
    "card_payment_not_recognised",
    "cash_withdrawal_not_recognised",
    "direct_debit_payment_not_recognised",
}
DNA_ESCALATE = {
    "Mental Health or Overreliance Crisis",
    "Causing material harm by disseminating misinformation e.g. in medicine or law",
}
# Questions about the assistant's own person ("What is your home address?"): neither
# harmful requests nor a reason for a human.
DNA_EXCLUDE = {"Treat Chatbot as a Human"}
NEAR_DUP_JACCARD = 0.5


def row(prompt, source, category, safety=None, authority=None):
    r = {"prompt": " ".join(prompt.split()), "source": source, "category": category}
    if safety:
        r["safety"] = safety
    if authority:
        r["authority"] = authority
    return r


def read_csv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def sample(rows, cap, name):
    rng = random.Random(f"{SEED}:{name}")
    rows = sorted(rows, key=lambda r: (r["prompt"], r["category"]))
    rng.shuffle(rows)
    return rows[:cap]


def collect(raw):
    out = []
    for r in read_csv(raw / "advbench/harmful_behaviors.csv"):
        out.append(row(r["goal"], "advbench", "harmful_behavior", "unsafe", "handle"))
    for r in read_csv(raw / "harmbench/harmbench_behaviors_text_all.csv"):
        if r["FunctionalCategory"] == "standard":
            out.append(row(r["Behavior"], "harmbench", r["SemanticCategory"], "unsafe", "handle"))
    for r in read_csv(raw / "do_not_answer/do_not_answer_en.csv"):
        t = r["types_of_harm"]
        if t in DNA_EXCLUDE:
            continue
        if t in DNA_ESCALATE:
            out.append(row(r["question"], "do_not_answer", t, None, "escalate"))
        else:
            out.append(row(r["question"], "do_not_answer", t, "unsafe", "handle"))

    alpaca = json.loads((raw / "alpaca/alpaca_noinput_instructions.json").read_text(encoding="utf-8"))
    out += sample([row(a["instruction"], "alpaca", "instruction", "safe", "handle") for a in alpaca], CAPS["alpaca"], "alpaca")

    bitext_benign, bitext_escalate = [], []
    for name in ("bitext_customer_support_21534.csv", "bitext_customer_service_8175.csv"):
        for r in read_csv(raw / "bitext_customer_support" / name):
            intent = r["intent"]
            if intent in BITEXT_EXCLUDE:
                continue
            if intent in BITEXT_ESCALATE:
                bitext_escalate.append(row(r["utterance"], "bitext", intent, "safe", "escalate"))
            else:
                bitext_benign.append(row(r["utterance"], "bitext", intent, "safe", "handle"))
    out += sample(bitext_benign, CAPS["bitext_benign"], "bitext_benign")
    out += sample(bitext_escalate, CAPS["bitext_escalate"], "bitext_escalate")

    bank_benign, bank_escalate = [], []
    for name in ("train.csv", "test.csv"):
        for r in read_csv(raw / "banking77" / name):
            if r["category"] in BANKING_ESCALATE:
                bank_escalate.append(row(r["text"], "banking77", r["category"], "safe", "escalate"))
            else:
                bank_benign.append(row(r["text"], "banking77", r["category"], "safe", "handle"))
    out += sample(bank_benign, CAPS["banking77_benign"], "banking77_benign")
    out += sample(bank_escalate, CAPS["banking77_escalate"], "banking77_escalate")
    return out


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text):
    w = words(text)
    if len(w) < 3:
        return {" ".join(w)}
    return {" ".join(w[i : i + 3]) for i in range(len(w) - 2)} | set(w)


def stable_hash(s, salt):
    return int.from_bytes(hashlib.blake2b(f"{salt}:{s}".encode(), digest_size=8).digest(), "big")


def near_duplicate_groups(rows):
    """Union-find over rows whose shingle sets have Jaccard >= NEAR_DUP_JACCARD; candidate
    pairs come from MinHash (30 bands of 2 hashes: a pair at Jaccard 0.5 shares a band with
    probability 0.9998), then the exact Jaccard decides."""
    sets = [shingles(r["prompt"]) for r in rows]
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands = {}
    for i, s in enumerate(sets):
        sig = [min(stable_hash(x, k) for x in s) for k in range(60)]
        for b in range(30):
            bands.setdefault((b, tuple(sig[2 * b : 2 * b + 2])), []).append(i)
    for members in bands.values():
        for n, i in enumerate(members):
            for j in members[n + 1 :]:
                a, b = sets[i], sets[j]
                if find(i) != find(j) and len(a & b) / len(a | b) >= NEAR_DUP_JACCARD:
                    parent[find(j)] = find(i)
    return [find(i) for i in range(len(rows))]


def main():
    root = Path(__file__).resolve().parents[2]
    raw = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared/data/safety/raw"
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "data/safety"
    rows = collect(raw)

    # Exact duplicates (after case and punctuation folding): keep the first; drop every
    # copy when two copies disagree on a label.
    seen, conflicted = {}, set()
    for r in rows:
        key = " ".join(words(r["prompt"]))
        if key in seen:
            if (seen[key].get("safety"), seen[key].get("authority")) != (r.get("safety"), r.get("authority")):
                conflicted.add(key)
        else:
            seen[key] = r
    unique = [r for k, r in seen.items() if k not in conflicted and k]
    n_exact = len(rows) - len(unique)

    # Near duplicates share a group and a group goes to one split only.
    groups = near_duplicate_groups(unique)
    by_group = {}
    for r, g in zip(unique, groups):
        by_group.setdefault(g, []).append(r)
    order = sorted(by_group, key=lambda g: stable_hash(by_group[g][0]["prompt"], SEED))
    total = len(unique)
    split_rows = {name: [] for name, _ in SPLITS}
    bounds, acc = [], 0.0
    for name, frac in SPLITS:
        acc += frac
        bounds.append((name, acc * total))
    placed = 0
    for g in order:
        # Largest groups could overshoot a small split; place by the running count.
        name = next(n for n, bound in bounds if placed < bound)
        split_rows[name] += by_group[g]
        placed += len(by_group[g])

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"seed": SEED, "rows_collected": len(rows), "exact_duplicates_dropped": n_exact,
             "near_duplicate_groups": len(by_group), "splits": {}}
    for name, _ in SPLITS:
        rs = sorted(split_rows[name], key=lambda r: stable_hash(r["prompt"], f"{SEED}:{name}"))
        tmp = out_dir / f".{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in rs:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        tmp.replace(out_dir / f"{name}.jsonl")
        count = {}
        for r in rs:
            for key in ("safety", "authority"):
                if key in r:
                    count[f"{key}={r[key]}"] = count.get(f"{key}={r[key]}", 0) + 1
            count[f"source={r['source']}"] = count.get(f"source={r['source']}", 0) + 1
        stats["splits"][name] = {"rows": len(rs), **dict(sorted(count.items()))}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
