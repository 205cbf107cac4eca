"""Generation speed: a P-tuned SmolLM2 decoding in onnxruntime (ptedge, onnxruntime-genai)
against PyTorch.

Tokens per second of greedy decoding for the same ``--head generate`` run, at batch 1
and batch 8, ``--threads`` threads each (default 2), measured in one process taking
turns round by round so machine drift hits every method:

- ``pytorch``: transformers' ``generate`` on the unfused model with the prompt spliced in
  as ``inputs_embeds``, KV cache on (the way a PEFT user decodes);
- ``ptedge_trace_int8``: the previous bundle format (``--graph trace``: optimum's
  decoder, weight-only int8 chosen by the guard), ``ptedge.decoding``'s loop;
- ``ptedge_fp32`` / ``ptedge_int8`` / ``ptedge_int4``: today's bundles (onnxruntime-genai's
  builder graph with the prompt rows grafted in, ``--format genai``), decoded by
  ``ptedge.decoding`` (shared cache buffers, IO binding), as ``Predictor.generate`` does;
- ``genai_int4``: onnxruntime-genai itself on the int4 ``--format genai`` folder;
- ``genai_plain_int4``: onnxruntime-genai on its own int4 build of the plain backbone
  (no prompt), fed the same ids with each pseudo id replaced by an ordinary token (same
  token count): what the prompt costs, if anything.

Prompts are encoded before timing (the same ids for every method); every method decodes
exactly ``--new-tokens`` tokens per row (end-of-sequence ignored), prompt included in the
time. Writes ``generate.{json,md}`` to ``--out`` (default ``docs/results``).

    python tools/bench_generate.py                 # trains runs/bench/p36 first if missing
    python tools/bench_generate.py --run runs/p36 --data ../shared/data/trex/test/P36.jsonl
    python tools/bench_generate.py --run runs/p36 --quick

Without ``--run`` it trains (once, reused while its parameters hold) a P36 ("capital")
prompt on SmolLM2 at ptedge's defaults except ``--steps 120`` (dev exact match ~0.8 on
107 facts; a speed benchmark needs a prompt the int8/int4 guards can judge, not the best
one), and decodes P36 test facts.

Not a quality benchmark: as a sanity check it also counts the records whose greedy text
(stopping at end-of-sequence) from each ptedge bundle and each genai folder equals the
unfused PyTorch model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {  # name -> (quantize, graph, format, max drop): each as a user gets it
    "trace_int8": ("int8", "trace", "onnx", 1.0),
    "fp32": (None, "auto", "genai", 1.0),
    "int8": ("int8", "auto", "genai", 1.0),
    "int4": ("int4", "auto", "genai", 1.0),
}
P36 = {
    "template": "[P:4] {sub_label} [P:4] [MASK]",
    "train": "trex/train/P36.jsonl",
    "dev": "trex/dev/P36.jsonl",
    "test": "trex/test/P36.jsonl",
    "steps": 120,
}


def default_run() -> tuple[Path, str]:
    """(the P36 generation run under runs/bench, its test file), trained when missing."""
    import _bench_common as bc

    from ptedge.backbones import fetch
    from ptedge.train import TrainArgs, train

    data = bc.need_data("trex")
    model = fetch("smollm2-135m")
    run = ROOT / "runs" / "bench" / "p36"
    params = {"model": str(model), **P36}
    args = TrainArgs(
        model=str(model),
        train=str(data.parent / P36["train"]),
        dev=str(data.parent / P36["dev"]),
        template=P36["template"],
        out=str(run),
        label_field="obj_label",
        head="generate",
        steps=P36["steps"],
        seed=0,
        force=True,
    )
    bc.Cache(run.parent).get(run, params, lambda: train(args, False), "ptedge.json")
    return run, str(data.parent / P36["test"])


def _bundle(run: Path, out: Path, spec: tuple, data: str) -> Path:
    """Export once, as a user gets it (the default guard on 64 records), or the recipe
    that lost least if none passes (this is a speed benchmark)."""
    from ptedge.export import ExportArgs, export

    quantize, graph, fmt, max_drop = spec
    if not (out / "ptedge.json").is_file():
        export(
            ExportArgs(
                runs=[str(run)],
                out=str(out),
                quantize=quantize,
                graph=graph,
                format=fmt,
                eval_file=data,
                eval_max=64,
                max_drop=max_drop,
                force=True,
            )
        )
    return out


def _encode(p, records: list[dict]):
    from ptedge.template import encode

    _, spec = p.task(None)
    return encode(spec["template"], p.tokenizer, records, padding_side="left")


def _torch_decoder(run: Path):
    """Greedy decoding with transformers' generate (KV cache) on the unfused model."""
    import torch

    from ptedge.model import load_run

    cfg, model, _, compiled, _ = load_run(run)

    @torch.inference_mode()
    def generate(enc, max_new_tokens):
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


def _ptedge_decoder(p):
    from ptedge.decoding import decode

    pad = p.task(None)[1]["template"]["pad_id"]

    def generate(enc, max_new_tokens):
        # eos_id=-1: decode exactly max_new_tokens, as the PyTorch side does
        out = decode(p.session, enc.input_ids, enc.attention_mask, -1, pad, max_new_tokens)
        return sum(len(t) for t in out)

    return generate


def _genai_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(
        json.dumps(
            {
                "model": {
                    "decoder": {
                        "session_options": {
                            "intra_op_num_threads": threads,
                            "inter_op_num_threads": 1,
                        }
                    }
                }
            }
        )
    )
    return og.Model(config)


def _genai_rows(enc, pad_id: int, replace: tuple[int, int] | None = None) -> np.ndarray:
    """Right-padded int32 ids (B, T) as onnxruntime-genai takes them; ``replace`` =
    (first pseudo id, filler): pseudo ids become the filler token (same length)."""
    lengths = enc.attention_mask.sum(-1)
    width = enc.input_ids.shape[1]
    out = np.full(enc.input_ids.shape, pad_id, dtype=np.int32)
    for b, n in enumerate(lengths):
        row = enc.input_ids[b, width - n :]
        if replace is not None:
            row = np.where(row >= replace[0], replace[1], row)
        out[b, :n] = row
    return out


def _genai_decoder(model, pad_id: int, replace: tuple[int, int] | None = None):
    import onnxruntime_genai as og

    def generate(enc, max_new_tokens):
        ids = _genai_rows(enc, pad_id, replace)
        total = ids.shape[1] + max_new_tokens
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=total, min_length=total, batch_size=ids.shape[0]
        )
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return ids.shape[0] * max_new_tokens

    return generate


def _genai_texts(model, tok, enc, pad_id: int, eos: int, max_new_tokens: int) -> list[str]:
    """Greedy texts of onnxruntime-genai, one record at a time, stopping at eos."""
    import onnxruntime_genai as og

    texts = []
    for b in range(enc.input_ids.shape[0]):
        row = enc.input_ids[b][enc.attention_mask[b] == 1].astype(np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(row) + max_new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(row[None])
        while not gen.is_done():
            gen.generate_next_token()
        new = [int(t) for t in gen.get_sequence(0)[len(row) :]]
        texts.append(tok.decode(new[: new.index(eos)] if eos in new else new).strip())
    return texts


def _reference_texts(run: Path, records: list[dict], max_new_tokens: int) -> list[str]:
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
    return [tok.decode(t).strip() for t in ref]


def main() -> None:
    import torch

    from ptedge.data import read_records
    from ptedge.export import builder
    from ptedge.runtime import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        default=None,
        help="a --head generate run folder (default: runs/bench/p36, trained when missing)",
    )
    ap.add_argument(
        "--data",
        default=None,
        help="records (default: P36 test facts for the default run, else the run's train file)",
    )
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="export the bundles again")
    ap.add_argument("--build-only", action="store_true", help="export the bundles, then stop")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    rounds, new_tokens = (1, 4) if a.quick else (a.rounds, a.new_tokens)
    torch.set_num_threads(a.threads)
    if a.run is None:
        run, test = default_run()
    else:
        run, test = Path(a.run), None
    cfg = json.loads((run / "ptedge.json").read_text())
    data = a.data or test or cfg["train_file"]
    records = list(read_records(data))[:64]
    work = run.parent / f"{run.name}-bench"
    if a.fresh and work.exists():
        shutil.rmtree(work)
    bundles = {n: _bundle(run, work / n, spec, data) for n, spec in BUNDLES.items()}
    plain = builder.build(cfg["model"], "int4", {})
    if a.build_only:
        return
    predictors = {n: Predictor(b, threads=a.threads) for n, b in bundles.items()}
    genai_models = {
        "genai_int4": _genai_model(bundles["int4"], a.threads),
        "genai_plain_int4": _genai_model(plain, a.threads),
    }
    p0 = predictors["fp32"]
    _, spec = p0.task(None)
    pad, vocab = spec["template"]["pad_id"], p0.manifest["backbone"]["vocab_size"]
    filler = p0.tokenizer.encode(" the", add_special_tokens=False).ids[0]
    methods = {"pytorch": _torch_decoder(run)}
    methods |= {f"ptedge_{n}": _ptedge_decoder(p) for n, p in predictors.items()}
    methods["genai_int4"] = _genai_decoder(genai_models["genai_int4"], pad)
    methods["genai_plain_int4"] = _genai_decoder(
        genai_models["genai_plain_int4"], pad, (vocab, filler)
    )
    batches = {
        batch: [
            _encode(p0, records[r * batch : (r + 1) * batch] or records[:batch])
            for r in range(rounds)
        ]
        for batch in (1, 8)
    }
    results: dict[str, dict[int, list[float]]] = {m: {1: [], 8: []} for m in methods}
    for fn in methods.values():  # warm-up
        fn(batches[1][0], 2)
        fn(batches[8][0], 2)
    load = _loadavg()
    for r in range(rounds):
        for batch in (1, 8):
            names = list(methods)
            names = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
            for name in names:
                t0 = time.perf_counter()
                n = methods[name](batches[batch][r], new_tokens)
                results[name][batch].append(n / (time.perf_counter() - t0))
    table = {m: {b: statistics.median(v) for b, v in d.items()} for m, d in results.items()}

    n_check = 8 if a.quick else 32
    check = records[:n_check]
    ref = _reference_texts(run, check, new_tokens)
    same = {}
    for name, p in predictors.items():
        got = [g["text"] for g in p.generate(check, max_new_tokens=new_tokens)]
        same[f"ptedge_{name}"] = sum(x == y for x, y in zip(got, ref, strict=True))
    import onnxruntime_genai as og

    enc = _encode(p0, check)
    for name in ("fp32", "int8", "int4"):
        model = _genai_model(bundles[name], a.threads)
        texts = _genai_texts(model, og.Tokenizer(model), enc, pad, spec["eos_id"], new_tokens)
        same[f"genai_{name}"] = sum(x == y for x, y in zip(texts, ref, strict=True))
    base = table["ptedge_trace_int8"]
    report = {
        "machine": {
            "cpu": _cpu(),
            "threads": a.threads,
            "python": platform.python_version(),
            "loadavg_before": load,
            "loadavg_after": _loadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "run": str(run),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "tokens_per_s": table,
        "ratio_vs_pytorch": {
            m: {b: table[m][b] / table["pytorch"][b] for b in (1, 8)} for m in table
        },
        "ratio_vs_previous_int8": {m: {b: table[m][b] / base[b] for b in (1, 8)} for m in table},
        "greedy_text_check": {"n": n_check, "equal_to_pytorch": same},
        "recipes": {
            n: json.loads((b / "ptedge.json").read_text())["quantization"]
            for n, b in bundles.items()
        },
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "generate.md").write_text(md)
    print(md)


def markdown(report: dict) -> str:
    table, threads = report["tokens_per_s"], report["machine"]["threads"]
    lines = [
        "| method | batch 1 tok/s | batch 8 tok/s | x PyTorch (1) | x PyTorch (8) "
        "| x previous int8 (1) | x previous int8 (8) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in table:
        r, q = report["ratio_vs_pytorch"][m], report["ratio_vs_previous_int8"][m]
        lines.append(
            f"| {m} | {table[m][1]:.1f} | {table[m][8]:.1f} | {r[1]:.2f} | {r[8]:.2f} "
            f"| {q[1]:.2f} | {q[8]:.2f} |"
        )
    chk = report["greedy_text_check"]
    same = ", ".join(f"{m} {k}/{chk['n']}" for m, k in chk["equal_to_pytorch"].items())
    best = max(("ptedge_int8", "ptedge_int4"), key=lambda m: table[m][1])
    goals = [
        f"- batch 1, {threads} threads, {best} >= 2x the previous int8 bundle: "
        f"{table[best][1] / table['ptedge_trace_int8'][1]:.2f}x "
        f"({'met' if table[best][1] >= 2 * table['ptedge_trace_int8'][1] else 'not met'})",
        f"- batch 1, {best} >= onnxruntime-genai's int4 build of the plain backbone: "
        f"{table[best][1]:.1f} vs {table['genai_plain_int4'][1]:.1f} tok/s "
        f"({'met' if table[best][1] >= table['genai_plain_int4'][1] else 'not met'})",
    ]
    m = report["machine"]
    return (
        f"Greedy decoding, {report['new_tokens']} new tokens per row, median of "
        f"{report['rounds']} rounds (methods taking turns), {threads} thread(s), {m['cpu']}, "
        f"{report['date']}; load average before / after: {m['loadavg_before']} / "
        f"{m['loadavg_after']}.\n\n"
        + "\n".join(lines)
        + "\n\nGoals:\n"
        + "\n".join(goals)
        + f"\n\nGreedy texts equal to PyTorch's (stopping at end-of-sequence): {same}.\n"
        + "Recipes chosen by the guard: "
        + ", ".join(f"{n}: {(q or {}).get('recipe')}" for n, q in report["recipes"].items())
        + ".\n"
    )


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
