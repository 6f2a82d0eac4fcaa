#!/usr/bin/env python3
"""Do the GGUF exports of an SO8T model decide as the model itself does? (#13, item 6)

    python3 scripts/data/export_agreement.py MODEL_DIR OUT.json [--quants q8_0,q4_k_m]
        [--data data/safety/test.jsonl] [--calibrate data/safety/val.jsonl] [--so8t PATH]

Exports MODEL_DIR at each type, scores the directory and every export with
`so8t eval --rows` on the same rows (prompt verdicts and the streaming rule over every
answer token, as the runtime computes them), and counts the rows whose decision differs
from the directory's, with the largest change of any of the four scores. With
--calibrate, each type is also exported with `so8t export --calibrate ROWS` (thresholds
moved on those rows, which must not be the scored ones) and scored as `TYPE+calibrated`.
"""
import argparse
import json
import os
import subprocess
import tempfile

ROOT = os.path.join(os.path.dirname(__file__), "../..")
SCORES = ["p_unsafe", "p_escalate", "answer_unsafe", "answer_escalate"]


def rows(so8t: str, model: str, data: str, tmp: str) -> list:
    out = os.path.join(tmp, os.path.basename(model) + ".rows.jsonl")
    subprocess.run([so8t, "eval", "--model", model, "--data", data, "--rows", out],
                   check=True, stdout=subprocess.DEVNULL)
    return [json.loads(l) for l in open(out, encoding="utf-8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--quants", default="q8_0,q4_k_m")
    ap.add_argument("--data", default=os.path.join(ROOT, "data/safety/test.jsonl"))
    ap.add_argument("--calibrate", help="labelled rows to calibrate the thresholds on")
    ap.add_argument("--so8t", default=os.path.join(ROOT, "target/release/so8t"))
    a = ap.parse_args()
    if a.calibrate and os.path.samefile(a.calibrate, a.data):
        raise SystemExit("--calibrate must name other rows than --data")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.out))) as tmp:
        ref = rows(a.so8t, a.model, a.data, tmp)
        report = {"model": a.model, "data": os.path.relpath(a.data, ROOT), "rows": len(ref),
                  **({"calibrated_on": os.path.relpath(a.calibrate, ROOT)} if a.calibrate else {}), "exports": {}}
        variants = [(q, []) for q in a.quants.split(",")]
        if a.calibrate:
            variants += [(q + "+calibrated", ["--calibrate", a.calibrate]) for q in a.quants.split(",")]
        for name, extra in variants:
            q = name.split("+")[0]
            gguf = os.path.join(tmp, f"{name}.gguf")
            done = subprocess.run([a.so8t, "export", a.model, "--out", gguf, "--quant", q, *extra],
                                  check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            got = rows(a.so8t, gguf, a.data, tmp)
            if [r["line"] for r in got] != [r["line"] for r in ref]:
                raise SystemExit(f"{name}: the export scored other rows than the directory")
            differ = [(r, g) for r, g in zip(ref, got) if r["decision"] != g["decision"]]
            report["exports"][name] = {
                **({"calibration": [l.strip() for l in done.stderr.splitlines() if "->" in l]} if extra else {}),
                "decisions_differ": len(differ),
                "agreement": 1 - len(differ) / len(ref),
                "max_abs_dp": max(abs(r[k] - g[k]) for r, g in zip(ref, got) for k in SCORES),
                "differing_rows": [
                    {"line": r["line"], "directory": r["decision"], "export": g["decision"],
                     **{k: [round(r[k], 4), round(g[k], 4)] for k in SCORES}}
                    for r, g in differ
                ],
            }
            os.unlink(gguf)
    tmp_out = a.out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp_out, a.out)
    for q, e in report["exports"].items():
        print(f"{q}: {e['decisions_differ']} of {len(ref)} decisions differ ({100 * (1 - e['agreement']):.1f}%), max |dp| {e['max_abs_dp']:.3f}")


if __name__ == "__main__":
    main()
