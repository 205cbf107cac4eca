"""Generation speed: a P-tuned SmolLM2 decoding in onnxruntime against PyTorch.

Tokens per second of greedy decoding for the same ``--head generate`` run:
PyTorch (transformers' ``generate`` on the unfused model with the prompt spliced in
as ``inputs_embeds``, KV cache on: the way a PEFT user decodes) against the ptedge
bundle in onnxruntime, fp32 and int8 (``Predictor.generate``, KV cache), at batch 1
and batch 8, 2 threads each (``--threads``), measured in one run alternating the methods
round by round so machine drift hits all of them. Every method decodes exactly
``--new-tokens`` tokens per row (end-of-sequence ignored), so tokens per second compare
like with like. Writes ``docs/results/generate.{json,md}``.

    python tools/bench_generate.py --run runs/p36 --data ../shared/data/trex/test/P36.jsonl
    python tools/bench_generate.py --run runs/p36 --quick

Not a quality benchmark: as a sanity check it also counts the records whose greedy text
(stopping at end-of-sequence) from each bundle equals the unfused PyTorch model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bundle(run: Path, out: Path, quantize: str | None, data: str) -> Path:
    """Export once; int8 as a user gets it (the default guard, 1 point on 64 records),
    or the recipe that lost least if none passes (this is a speed benchmark)."""
    from ptedge.export import ExportArgs, export

    if not (out / "ptedge.json").is_file():
        export(
            ExportArgs(
                runs=[str(run)],
                out=str(out),
                quantize=quantize,
                eval_file=data,
                eval_max=64,
                force=True,
            )
        )
    return out


def _torch_decoder(run: Path):
    """Greedy decoding with transformers' generate (KV cache) on the unfused model."""
    import torch

    from ptedge.model import load_run
    from ptedge.template import encode

    cfg, model, tok, compiled, _ = load_run(run)

    @torch.inference_mode()
    def generate(records, max_new_tokens):
        enc = encode(compiled, tok, records, padding_side="left")
        ids = torch.from_numpy(enc.input_ids)
        mask = torch.from_numpy(enc.attention_mask)
        embeds = model.embed(ids)  # (B, T, H) with the prompt rows spliced in
        out = model.backbone.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=cfg.eos_id,
            pad_token_id=compiled["pad_id"],
            min_new_tokens=max_new_tokens,
        )
        return out.shape[0] * max_new_tokens

    return generate


def _onnx_decoder(p):

    def generate(records, max_new_tokens):
        from ptedge.decoding import decode
        from ptedge.template import encode

        name, spec = p.task(None)
        enc = encode(spec["template"], p.tokenizer, records, padding_side="left")
        # eos_id=-1: decode exactly max_new_tokens, as the PyTorch side does
        out = decode(
            p.session,
            enc.input_ids,
            enc.attention_mask,
            -1,
            spec["template"]["pad_id"],
            max_new_tokens,
        )
        return sum(len(t) for t in out)

    return generate


def _same_texts(run: Path, predictors: dict, records: list[dict], max_new_tokens: int) -> dict:
    """Records whose greedy text from each bundle equals PyTorch's (stopping at eos)."""
    import torch

    from ptedge.model import load_run
    from ptedge.template import encode

    cfg, model, tok, compiled, _ = load_run(run)
    enc = encode(compiled, tok, records, padding_side="left")
    with torch.inference_mode():
        ref = model.greedy(
            torch.from_numpy(enc.input_ids),
            torch.from_numpy(enc.attention_mask),
            max_new_tokens,
            cfg.eos_id,
        )
    ref_text = [tok.decode(t).strip() for t in ref]
    same = {}
    for name, p in predictors.items():
        got = [g["text"] for g in p.generate(records, max_new_tokens=max_new_tokens)]
        same[name] = sum(a == b for a, b in zip(got, ref_text, strict=True))
    return {"n": len(records), "equal_to_pytorch": same}


def main() -> None:
    import torch

    from ptedge.data import read_records

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a --head generate run folder")
    ap.add_argument("--data", default=None, help="records (default: the run's train file)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    rounds, new_tokens = (1, 4) if a.quick else (a.rounds, a.new_tokens)
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    cfg = json.loads((run / "ptedge.json").read_text())
    data = a.data or cfg["train_file"]
    records = list(read_records(data))[:64]
    work = run.parent / f"{run.name}-bench"
    from ptedge.runtime import Predictor

    bundles = {q: _bundle(run, work / (q or "fp32"), q, data) for q in (None, "int8")}
    predictors = {
        f"onnx_{q or 'fp32'}": Predictor(b, threads=a.threads) for q, b in bundles.items()
    }
    methods = {"pytorch": _torch_decoder(run)} | {
        n: _onnx_decoder(p) for n, p in predictors.items()
    }
    results: dict[str, dict[int, list[float]]] = {m: {1: [], 8: []} for m in methods}
    for fn in methods.values():  # warm-up
        fn(records[:1], 2)
    for r in range(rounds):
        for batch in (1, 8):
            recs = records[r * batch : (r + 1) * batch] or records[:batch]
            for name, fn in methods.items():
                t0 = time.perf_counter()
                n = fn(recs, new_tokens)
                results[name][batch].append(n / (time.perf_counter() - t0))
    table = {m: {b: statistics.median(v) for b, v in d.items()} for m, d in results.items()}
    sanity = _same_texts(run, predictors, records[: 8 if a.quick else 32], new_tokens)
    report = {
        "machine": {"cpu": _cpu(), "threads": a.threads, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "run": str(run),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "tokens_per_s": table,
        "ratio_vs_pytorch": {
            m: {b: table[m][b] / table["pytorch"][b] for b in (1, 8)} for m in table
        },
        "greedy_text_check": sanity,
        "int8_recipe": json.loads((work / "int8" / "ptedge.json").read_text())["quantization"],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| method | batch 1 tok/s | batch 8 tok/s | x PyTorch (1) | x PyTorch (8) |",
        "|---|---|---|---|---|",
    ]
    for m in table:
        r = report["ratio_vs_pytorch"][m]
        lines.append(f"| {m} | {table[m][1]:.1f} | {table[m][8]:.1f} | {r[1]:.2f} | {r[8]:.2f} |")
    same = ", ".join(f"{m} {k}/{sanity['n']}" for m, k in sanity["equal_to_pytorch"].items())
    (out / "generate.md").write_text(
        f"Greedy decoding, {new_tokens} new tokens, median of {rounds} rounds, "
        f"{a.threads} thread(s), {report['machine']['cpu']}, {report['date']}.\n\n"
        + "\n".join(lines)
        + f"\n\nGreedy texts equal to PyTorch's: {same}.\n"
    )
    print("\n".join(lines))
    print(f"greedy texts equal to PyTorch's: {same}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
