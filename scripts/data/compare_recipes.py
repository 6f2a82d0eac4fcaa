#!/usr/bin/env python3
"""The numbers a recipe experiment's ship rule (scripts/train-eval.sh, at each variant's
call) is decided on, for the shipped heads and a variant side by side: on the validation
files only (val.jsonl and val_multi_turn.jsonl), never a test file, each head at its own
stored thresholds; and, from the variant's train.json, the benign answers of the model's own
answers (families own_answers_*) flagged by fits that never saw their family.

    python3 scripts/data/compare_recipes.py eval/qwen2.5-coder-0.5b-heads eval/qwen2.5-coder-0.5b-multi-turn

Reads BASE-val/report.json, BASE-val-multi-turn/report.json and the same for VARIANT
(files that are missing are left out) and VARIANT/train.json.
"""
import json
import os
import sys

FILES = [("val.jsonl", "-val"), ("val_multi_turn.jsonl", "-val-multi-turn")]


def metric(report, part, head, name):
    for h in report.get(part) or []:
        if h["head"] == head and h.get("metrics"):
            return h["metrics"].get(name)
    return None


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def own_answers_flagged(train):
    """Pooled over the own_answers_* families: (flagged answers, answers)."""
    flagged = answers = 0
    for fam in (train.get("held_out_answers") or {}).get("safety", []):
        if fam["family"].startswith("own_answers_"):
            answers += fam["answers"]
            flagged += round(fam["flagged"] * fam["answers"])
    return flagged, answers


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    base, variant = sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/")
    rows = [
        ("prompt safety F1", "heads", "safety", "f1"),
        ("prompt safety FPR", "heads", "safety", "fpr"),
        ("prompt safety AUROC", "heads", "safety", "auroc"),
        ("answer safety F1", "responses", "safety", "f1"),
        ("answer safety FPR", "responses", "safety", "fpr"),
        ("prompt authority F1", "heads", "authority", "f1"),
        ("prompt authority AUROC", "heads", "authority", "auroc"),
    ]
    print(f"| file | measure | {os.path.basename(base)} | {os.path.basename(variant)} | change |")
    print("|---|---|---|---|---|")
    for file, suffix in FILES:
        b, v = load(base + suffix + "/report.json"), load(variant + suffix + "/report.json")
        if b is None or v is None:
            continue
        for label, part, head, name in rows:
            x, y = metric(b, part, head, name), metric(v, part, head, name)
            if x is None or y is None:
                continue
            print(f"| {file} | {label} | {x:.3f} | {y:.3f} | {y - x:+.3f} |")
    train = load(os.path.join(variant, "train.json"))
    if train:
        flagged, answers = own_answers_flagged(train)
        if answers:
            print(f"\n{os.path.basename(variant)}: own_answers_* families' answers flagged by "
                  f"held-out fits: {flagged} of {answers} ({100 * flagged / answers:.1f}%)")


if __name__ == "__main__":
    main()
