"""Speed and size: PEFT P-tuning in PyTorch against ptedge fp32, int8 and int4 bundles.

Two backbones, each with a real task: all-MiniLM-L6-v2 on BANKING77 (linear head, 6 prompt
tokens) and SmolLM2-135M on SST-2 (verbalizer negative/positive, 10 prompt tokens). For
each, three systems answer the same real test sentences in one process, 2 threads each
(``torch.set_num_threads(2)``; ``Predictor(threads=2)``), taking turns A B C, B C A, ... so
that drift of this shared machine hits all of them (latency in blocks of calls, see
``alternate_latency``):

- ``peft``: PEFT as users deploy it: the base model plus ``PeftModel.from_pretrained`` of a
  saved P-tuning adapter. That sets ``inference_mode=True``, and the saved adapter holds
  the prompt encoder's *output*, so the prompt table is precomputed by PEFT itself (no
  LSTM at inference). Calls run under ``torch.inference_mode()``, from text (HF fast
  tokenizer) to labels and probabilities. For SmolLM2 PEFT is given ``logits_to_keep=1``
  (only the last position goes through the LM head) and left padding, its best case.
- ``ptedge_fp32`` / ``ptedge_int8``: ``ptedge.runtime.Predictor(bundle, threads=2)``,
  ``predict`` from records to labels;
- MiniLM also: ``ptedge_int4`` (``--quantize int4``) and ``ptedge_int8_dynamic``, the int8
  recipe bundles had before static activation scales (recipe ``all``: onnxruntime's dynamic
  quantization of the fused encoder, one activation scale per batch, rebuilt here by
  ``previous_int8``), side by side with the rest.

Measured:
- batch-1 latency p50/p90 over real test sentences (after warm-up); also with each system
  alone in its own process (``alone_latency``): in one process, two onnxruntime sessions
  taking turns slow the first calls of each block (the other session's worker threads
  still spin; measured: MiniLM int8 p90 2.6-2.8 ms alone or beside PEFT, 3.8-6.0 ms
  beside another onnxruntime session), which an app running one bundle never sees;
- throughput at batch 32: the same 32-record batches for every system (so ptedge's
  length sorting inside ``predict`` cannot reduce its padding), median of repeats;
- cold start: a fresh ``python -c`` process from spawn to its first prediction, and that
  process's peak RSS (``VmHWM`` read by the child; ``wait4``'s ``ru_maxrss`` is not usable
  here: after vfork+exec it reports the *parent's* peak, ~1-2 GB for this process);
- size on disk of what must be shipped: PEFT = the backbone's config, weights and
  tokenizer files + the adapter folder; ptedge = the bundle folder. Also the installed
  size of each runtime's Python packages (requirement closure of torch + transformers +
  peft, against onnxruntime + tokenizers + numpy + click);
- prompt overhead: bare ``session.run`` of the fused bundle against the same backbone
  exported by ptedge without prompts (a ``--steps 0`` run of a template with no ``[P]``),
  fed the same ids with the pseudo ids replaced by an ordinary token (same token count),
  with an A/A control (a second session of the no-prompt bundle timed in the same
  rotation: the noise floor) and a check that the two graphs differ only in the
  embedding table's rows;
- runtime overhead: ``Predictor.predict`` at batch 1 against ``session.run`` of the same
  session on the same ids encoded beforehand;
- SmolLM2 only: ptedge's task graph against a graph that outputs logits for every
  position over the whole vocabulary (optimum's ``text-generation`` export of the
  backbone, fp32), same token count;
- training throughput (samples/s) of ``ptedge.train`` against PEFT's P-tuning loop on the
  same backbone, data and batch size (per-step times after warm-up steps; ptedge's come
  from its ``timing.jsonl`` with ``log_every=1``); in full mode also ptedge with the
  frozen backbone in bf16 (``TrainArgs(dtype="bf16")``).

Everything it needs (ptedge runs and bundles, PEFT adapters, the full-logits graph) is
built under ``--work`` when missing, and reused while its parameters hold.
``--build-only`` builds them and stops (nothing is timed while building, so it may share
the machine, e.g. ``--threads 1`` beside other work); the measuring run then reuses them.

    python tools/bench_speed.py            # full run (see docs/results/speed.md)
    python tools/bench_speed.py --quick    # minimal sizes, for CI smoke tests

Writes ``speed.json``, ``speed.md`` (ratios PEFT ÷ ptedge-int8) and ``speed.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _bench_common as bc

SYSTEMS = ("peft", "ptedge_fp32", "ptedge_int8")
THREADS = 2
BATCH = 32
BLOCK = 25  # latency: consecutive calls per system before the next takes its turn
REWARM = 3  # untimed calls at the start of each block

FULL = {
    "latency_n": 200,
    "warmup": 10,
    "tput_records": 256,
    "tput_repeats": 3,
    "cold_repeats": 3,
    "alone_rounds": 2,
    "build_steps": {"minilm": 150, "smollm2": 60},
    "train_warmup": 2,
    "train_measured": 8,
    "train_rounds": 2,
    "eval_max": 1000,  # the CLI's default: the guard a user's export runs
    "test_max": None,  # all test records for the causal test-accuracy goal
    "prompt_overhead": ("minilm", "smollm2"),  # models whose no-prompt bundles are built
    "bf16": True,
}
QUICK = {
    "latency_n": 6,
    "warmup": 2,
    "tput_records": 32,
    "tput_repeats": 1,
    "cold_repeats": 1,
    "alone_rounds": 1,
    "build_steps": {"minilm": 2, "smollm2": 2},
    "train_warmup": 1,
    "train_measured": 2,
    "train_rounds": 1,
    "eval_max": 16,
    "test_max": 16,
    "prompt_overhead": ("minilm",),  # SmolLM2 exports take minutes each
    "bf16": False,
}


@dataclass
class Spec:
    """One backbone with its task, as both systems see it."""

    name: str
    backbone: str
    task: str
    kind: str  # seq_cls | causal (PEFT task type)
    train: Path
    test: Path
    field: str
    label_field: str
    template: str
    no_prompt: str
    head: str
    n_virtual: int
    train_batch: int
    verbalizer: dict | None = None
    eval_file: Path | None = None
    peft_format: str = "{}"  # PEFT's input text, from the record's field
    extra: tuple[str, ...] = ()  # more ptedge systems: "int4", "int8_dynamic"

    def peft_text(self, record: dict) -> str:
        return self.peft_format.format(record[self.field])


def specs() -> dict[str, Spec]:
    b77 = bc.DATA / "banking77"
    sst = bc.DATA / "sst2"
    return {
        "minilm": Spec(
            name="minilm",
            backbone="minilm-l6",
            task="banking77",
            kind="seq_cls",
            train=b77 / "train.csv",
            test=b77 / "test.csv",
            field="text",
            label_field="category",
            template=bc.B77_TEMPLATE,
            no_prompt=bc.B77_NO_PROMPT,
            head="linear",
            n_virtual=bc.B77_VIRTUAL,
            train_batch=32,
            extra=("int4", "int8_dynamic"),
        ),
        "smollm2": Spec(
            name="smollm2",
            backbone="smollm2-135m",
            task="sst2",
            kind="causal",
            train=sst / "train.tsv",
            test=sst / "test.tsv",
            field="sentence",
            label_field="label",
            template=bc.SST2_TEMPLATE,
            no_prompt=bc.SST2_MANUAL,
            head="lm",
            n_virtual=bc.SST2_VIRTUAL,
            train_batch=16,
            verbalizer=bc.SST2_VERBALIZER,
            eval_file=sst / "dev.tsv",
            peft_format=bc.SST2_PEFT_TEXT.replace("{sentence}", "{}"),
        ),
    }


# -- building what is measured ------------------------------------------------------------


@dataclass
class Built:
    model_dir: Path
    run: Path
    bundle_fp32: Path
    bundle_int8: Path
    noprompt_fp32: Path | None
    noprompt_int8: Path | None
    adapter: Path
    labels: list[str]
    label_ids: list[int] | None
    full_logits: Path | None = None
    extra: dict = field(default_factory=dict)


def _train_args(spec: Spec, model_dir: Path, out: Path, template: str, steps: int, **kw):
    from ptedge.train import TrainArgs

    return TrainArgs(
        model=str(model_dir),
        train=str(spec.train),
        template=template,
        out=str(out),
        label_field=spec.label_field,
        verbalizer=spec.verbalizer,
        head=spec.head,
        steps=steps,
        batch_size=spec.train_batch,
        seed=0,
        force=True,
        **kw,
    )


def _export(
    run: Path, out: Path, quantize: str | None, spec: Spec, eval_max: int, graph: str = "auto"
) -> None:
    from ptedge.export import ExportArgs, export

    export(
        ExportArgs(
            runs=[str(run)],
            out=str(out),
            quantize=quantize,
            graph=graph,
            eval_file=str(spec.eval_file) if spec.eval_file else None,
            eval_max=eval_max,
            force=True,
            allow_accuracy_drop=True,  # report the guard's verdict, do not stop the benchmark
        )
    )


def _labels(spec: Spec) -> list[str]:
    from ptedge.data import labels_of, read_records

    if spec.verbalizer:
        return list(spec.verbalizer)
    return sorted(set(labels_of(read_records(spec.train), spec.label_field)))


def peft_examples(spec: Spec, tok, labels: list[str], n: int | None = None):
    from ptedge.data import read_records

    recs = bc.subsample(read_records(spec.train), n)
    index = {lab: i for i, lab in enumerate(labels)}
    return [(r, index[r[spec.label_field]]) for r in recs]


def peft_task(spec: Spec, tok, label_ids):
    return bc.PeftTask(
        spec.kind, tok, spec.peft_text, label_ids=label_ids, n_virtual=spec.n_virtual
    )


def build(spec: Spec, cache: bc.Cache, cfg: dict) -> Built:
    from ptedge.backbones import fetch
    from ptedge.train import train

    model_dir = fetch(spec.backbone)
    work = cache.work / spec.name
    steps = cfg["build_steps"][spec.name]
    labels = _labels(spec)
    tok = bc.hf_tokenizer(model_dir)
    label_ids = (
        bc.single_token_ids(tok, [spec.verbalizer[k] for k in labels]) if spec.verbalizer else None
    )
    base = {"backbone": spec.backbone, "template": spec.template, "steps": steps}
    run = cache.get(
        work / "run",
        base,
        lambda: train(_train_args(spec, model_dir, work / "run", spec.template, steps), False),
        "ptedge.json",
    )
    plain = {**base, "template": spec.no_prompt, "steps": 0}
    overhead = spec.name in cfg["prompt_overhead"]
    norun = None
    if overhead:
        norun = cache.get(
            work / "run-noprompt",
            plain,
            lambda: train(
                _train_args(spec, model_dir, work / "run-noprompt", spec.no_prompt, 0), False
            ),
            "ptedge.json",
        )
    bundles = {}
    for name, src, params, quant in (
        ("bundle-fp32", run, base, None),
        ("bundle-int8", run, base, "int8"),
        ("noprompt-fp32", norun, plain, None),
        ("noprompt-int8", norun, plain, "int8"),
    ):
        if src is None:
            bundles[name] = None
            continue
        out = work / name
        bundles[name] = cache.get(
            out,
            {**params, "quantize": quant, "eval_max": cfg["eval_max"], "export": bc.EXPORT_REV},
            lambda src=src, out=out, quant=quant: _export(src, out, quant, spec, cfg["eval_max"]),
            "ptedge.json",
        )

    extra = {}
    for x in spec.extra:
        out = work / f"bundle-{x}"
        make = (
            (lambda out=out: previous_int8(bundles["bundle-fp32"], out, model_dir))
            if x == "int8_dynamic"
            else (lambda out=out, x=x: _export(run, out, x, spec, cfg["eval_max"]))
        )
        extra[f"ptedge_{x}"] = cache.get(
            out,
            {**base, "quantize": x, "eval_max": cfg["eval_max"], "export": bc.EXPORT_REV},
            make,
            "ptedge.json",
        )

    def build_adapter():
        pm = bc.peft_new(spec.kind, model_dir, spec.n_virtual, len(labels))
        examples = peft_examples(spec, tok, labels)
        bc.peft_train(
            pm, peft_task(spec, tok, label_ids), examples, steps=steps, batch_size=spec.train_batch
        )
        pm.save_pretrained(str(work / "peft-adapter"))

    adapter = cache.get(
        work / "peft-adapter",
        {"backbone": spec.backbone, "n_virtual": spec.n_virtual, "steps": steps, "kind": spec.kind},
        build_adapter,
        "adapter_config.json",
    )
    full = None
    if spec.kind == "causal":

        def build_full():
            from optimum.exporters.onnx import main_export

            main_export(
                str(model_dir),
                str(work / "full-logits"),
                task="text-generation",
                do_validation=False,
            )

        full = cache.get(
            work / "full-logits",
            {"backbone": spec.backbone, "task": "text-generation"},
            build_full,
            "model.onnx",
        )
    return Built(
        model_dir=model_dir,
        run=run,
        bundle_fp32=bundles["bundle-fp32"],
        bundle_int8=bundles["bundle-int8"],
        noprompt_fp32=bundles["noprompt-fp32"],
        noprompt_int8=bundles["noprompt-int8"],
        adapter=adapter,
        labels=labels,
        label_ids=label_ids,
        full_logits=full,
        extra=extra,
    )


def previous_int8(fp32_bundle: Path, out: Path, model_dir: Path) -> None:
    """The int8 bundle of the recipe before static scales (``all``), for comparison only:
    the fused encoder through onnxruntime's dynamic quantization (one activation scale
    per batch, so answers depend on the batch), the embedding per-row int8; the head
    exclusion by its Gemm name, which the dynamic quantizer's Gemm->MatMul rename defeated."""
    import shutil

    import onnx

    from ptedge.config import BUNDLE_MANIFEST, read_json, write_json_atomic
    from ptedge.export import quant_graph as qg
    from ptedge.export.bundle import sha256_file, store_weights_apart
    from ptedge.export.fusion import encoder_shape, fuse_encoder

    manifest = read_json(fp32_bundle / BUNDLE_MANIFEST)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(fp32_bundle / "tokenizer.json", out / "tokenizer.json")
    model = onnx.load(str(fp32_bundle / manifest["model"]))
    heads = [n.name for n in model.graph.node if n.name.startswith(("/heads", "/lm_head"))]
    shape = encoder_shape(model_dir)
    fused, int8 = out / "fused.onnx", out / "model.int8.onnx"
    fuse_encoder(fp32_bundle / manifest["model"], fused, shape)
    qg.quantize_dynamic_int8(fused, int8, heads)
    fused.unlink()
    model = onnx.load(str(int8))
    qg.quantize_embedding_rows(model)
    onnx.save(model, str(int8))
    store_weights_apart(int8)
    manifest["model"] = int8.name
    manifest["quantization"] = {
        "recipe": "all",
        "precision": "int8",
        "method": previous_int8.__doc__,
    }
    manifest["files"] = {f.name: sha256_file(f) for f in sorted(out.iterdir()) if f.is_file()}
    write_json_atomic(out / BUNDLE_MANIFEST, manifest)


# -- the systems ---------------------------------------------------------------------------


class PeftSystem:
    """PEFT in PyTorch, from text to labels and probabilities."""

    def __init__(self, spec: Spec, b: Built):
        import torch

        self.torch = torch
        self.spec, self.labels, self.label_ids = spec, b.labels, b.label_ids
        side = "left" if spec.kind == "causal" else "right"
        self.tok = bc.hf_tokenizer(b.model_dir, padding_side=side)
        self.model = bc.peft_load(spec.kind, b.model_dir, b.adapter, len(b.labels))

    def predict(self, records: list[dict]) -> list[dict]:
        torch = self.torch
        texts = [self.spec.peft_text(r) for r in records]
        with torch.inference_mode():
            if self.spec.kind == "seq_cls":
                enc = self.tok(
                    texts, padding=True, truncation=True, max_length=128, return_tensors="pt"
                )
                scores = self.model(**enc).logits
            else:
                enc = self.tok(texts, padding=True, return_tensors="pt")
                logits = self.model(**enc, logits_to_keep=1).logits  # (B, 1, V)
                scores = logits[:, -1, self.label_ids]
            probs = scores.float().softmax(-1)
        best = probs.argmax(-1).tolist()
        return [
            {"label": self.labels[i], "score": float(p[i])}
            for i, p in zip(best, probs, strict=True)
        ]

    def tokens(self, record: dict) -> int:
        ids = self.tok(self.spec.peft_text(record))["input_ids"]
        return len(ids) + self.spec.n_virtual


class PtedgeSystem:
    def __init__(self, bundle: Path):
        from ptedge.runtime import Predictor

        self.p = Predictor(bundle, threads=THREADS)
        self.name, self.spec = self.p.task(None)
        self.inputs = {i.name for i in self.p.session.get_inputs()}  # no slot when mean-pooled

    def predict(self, records: list[dict]) -> list[dict]:
        return self.p.predict(records, batch_size=len(records))

    def feeds(self, records: list[dict]) -> dict:
        from ptedge.template import encode

        enc = encode(self.spec["template"], self.p.tokenizer, records)
        feeds = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "slot": enc.slot}
        return {k: v for k, v in feeds.items() if k in self.inputs}

    def run(self, feeds: dict):
        return self.p.session.run([self.spec["output"]], feeds)

    def tokens(self, record: dict) -> int:
        return int(self.feeds([record])["attention_mask"].sum())


def systems_of(b: Built) -> tuple[str, ...]:
    """The systems measured on one backbone: PEFT, ptedge fp32 and int8, then its extras."""
    return SYSTEMS + tuple(b.extra)


def _rotations(items: list, i: int) -> list:
    k = i % len(items)
    return items[k:] + items[:k]


def alternate_latency(fns: dict, inputs: list, warmup: int) -> dict[str, list[float]]:
    """Per name: seconds of fn(x) for each x after the first ``warmup`` (which only warm
    up). Names take turns in blocks of ``BLOCK`` inputs, in rotating order, each block
    after ``REWARM`` untimed calls.

    Blocks, not single calls: a call made right after another runtime's call may share
    the 2 cores with that runtime's still-spinning worker threads (PyTorch's OpenMP pool,
    onnxruntime's own), which no deployment does. Measured here, MiniLM batch 1 p50, per-call
    turns against blocks in one process: PEFT 23.9 against 9.0 ms and int8 6.8 against
    1.8 ms in one run, 9.2 against 9.0 and 1.7 against 1.6 ms in a later one: per-call turns
    are sometimes far slower, blocks were steady. ``interleaved_latency`` keeps the
    per-call figure in the report.
    """
    names = list(fns)
    for x in inputs[:warmup]:
        for n in names:
            fns[n](x)
    rest = inputs[warmup:]
    times: dict[str, list[float]] = {n: [] for n in names}
    for b, i in enumerate(range(0, len(rest), BLOCK)):
        block = rest[i : i + BLOCK]
        for n in _rotations(names, b):
            for x in block[:REWARM]:
                fns[n](x)
            for x in block:
                t0 = time.perf_counter()
                fns[n](x)
                times[n].append(time.perf_counter() - t0)
    return times


def interleaved_latency(fns: dict, inputs: list) -> dict[str, float]:
    """Per name: p50 ms of fn(x) with names taking turns after every call (the co-located
    worst case that ``alternate_latency`` avoids), for the report."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, x in enumerate(inputs):
        for n in _rotations(names, i):
            t0 = time.perf_counter()
            fns[n](x)
            times[n].append(time.perf_counter() - t0)
    return {n: bc.percentile([1000 * t for t in v], 50) for n, v in times.items()}


def alternate_throughput(fns: dict, batches: list, repeats: int) -> dict[str, float]:
    """Per name: median samples/s over ``repeats`` passes over ``batches``, alternating."""
    names = list(fns)
    n = sum(len(b) for b in batches)
    for name in names:  # warm-up: one batch each
        fns[name](batches[0])
    rates: dict[str, list[float]] = {nm: [] for nm in names}
    for rep in range(repeats):
        for name in _rotations(names, rep):
            t0 = time.perf_counter()
            for b in batches:
                fns[name](b)
            rates[name].append(n / (time.perf_counter() - t0))
    return {nm: sorted(r)[len(r) // 2] for nm, r in rates.items()}


def lat_summary(xs: list[float]) -> dict:
    ms = [1000 * x for x in xs]
    return {
        "p50": bc.percentile(ms, 50),
        "p90": bc.percentile(ms, 90),
        "mean": sum(ms) / len(ms),
        "n": len(ms),
    }


# -- cold start ----------------------------------------------------------------------------

_VMHWM = (
    "def _hwm():\n"
    "    for l in open('/proc/self/status'):\n"
    "        if l.startswith('VmHWM:'):\n"
    "            return int(l.split()[1])\n"
)

PEFT_CHILD = (
    "import json, sys\n"
    + _VMHWM
    + """a = json.loads(sys.argv[1])
import torch
torch.set_num_threads(a["threads"])
from peft import PeftModel
from transformers import AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification
tok = AutoTokenizer.from_pretrained(a["model"])
if a["kind"] == "seq_cls":
    base = AutoModelForSequenceClassification.from_pretrained(
        a["model"], num_labels=a["n_labels"], dtype=torch.float32)
else:
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
model = PeftModel.from_pretrained(base, a["adapter"]).eval()
with torch.inference_mode():
    enc = tok([a["text"]], return_tensors="pt")
    if a["kind"] == "seq_cls":
        scores = model(**enc).logits
    else:
        scores = model(**enc, logits_to_keep=1).logits[:, -1, a["label_ids"]]
    label = a["labels"][int(scores.softmax(-1).argmax(-1)[0])]
print(json.dumps({"label": label, "vmhwm_kb": _hwm()}), flush=True)
"""
)

PTEDGE_CHILD = (
    "import json, sys\n"
    + _VMHWM
    + """a = json.loads(sys.argv[1])
from ptedge.runtime import Predictor
p = Predictor(a["bundle"], threads=a["threads"])
label = p.predict([a["record"]], batch_size=1)[0]["label"]
print(json.dumps({"label": label, "vmhwm_kb": _hwm()}), flush=True)
"""
)


def cold_start(code: str, args: dict) -> dict:
    """Spawn ``python -c code``; seconds until it prints its first prediction, its peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=bc.ROOT,
    )
    line = proc.stdout.readline()
    dt = time.perf_counter() - t0
    proc.stdout.close()
    if proc.wait() != 0 or not line.strip():
        raise RuntimeError(f"cold-start child failed (exit {proc.returncode}): {args}")
    out = json.loads(line)
    return {"s": dt, "peak_rss_mb": out["vmhwm_kb"] / 1024, "label": out["label"]}


def measure_cold(spec: Spec, b: Built, record: dict, repeats: int) -> dict:
    peft_args = {
        "model": str(b.model_dir),
        "adapter": str(b.adapter),
        "kind": spec.kind,
        "n_labels": len(b.labels),
        "labels": b.labels,
        "label_ids": b.label_ids,
        "text": spec.peft_text(record),
        "threads": THREADS,
    }
    jobs = {
        "peft": (PEFT_CHILD, peft_args),
        "ptedge_fp32": (
            PTEDGE_CHILD,
            {"bundle": str(b.bundle_fp32), "record": record, "threads": THREADS},
        ),
        "ptedge_int8": (
            PTEDGE_CHILD,
            {"bundle": str(b.bundle_int8), "record": record, "threads": THREADS},
        ),
        **{
            n: (PTEDGE_CHILD, {"bundle": str(path), "record": record, "threads": THREADS})
            for n, path in b.extra.items()
        },
    }
    runs: dict[str, list[dict]] = {n: [] for n in jobs}
    for code, a in jobs.values():  # warm the page cache once, not measured
        cold_start(code, a)
    for rep in range(repeats):
        for n in _rotations(list(jobs), rep):
            runs[n].append(cold_start(*jobs[n]))
    out = {}
    for n, rs in runs.items():
        s = sorted(r["s"] for r in rs)
        m = sorted(r["peak_rss_mb"] for r in rs)
        out[n] = {"s": s[len(s) // 2], "peak_rss_mb": m[len(m) // 2], "runs": rs}
    return out


ALONE_CHILD = """import json, sys, time
from pathlib import Path
a = json.loads(sys.argv[1])
sys.path.insert(0, a["tools"])
import bench_speed as bs
bs.THREADS = a["threads"]
if a["system"] == "peft":
    import torch
    torch.set_num_threads(a["threads"])
    b = bs.Built(model_dir=Path(a["model"]), run=None, bundle_fp32=None, bundle_int8=None,
                 noprompt_fp32=None, noprompt_int8=None, adapter=Path(a["adapter"]),
                 labels=a["labels"], label_ids=a["label_ids"])
    s = bs.PeftSystem(bs.specs()[a["spec"]], b)
else:
    s = bs.PtedgeSystem(Path(a["bundle"]))
recs = a["records"]
for r in recs[: a["warmup"]]:
    s.predict([r])
ts = []
for r in recs[a["warmup"] :]:
    t0 = time.perf_counter()
    s.predict([r])
    ts.append(time.perf_counter() - t0)
print(json.dumps(ts), flush=True)
"""


def alone_latency(spec: Spec, b: Built, records: list[dict], cfg: dict) -> dict:
    """Per system: batch-1 seconds per call with the system alone in a fresh process (as
    an app deploys it), same records and warm-up; ``alone_rounds`` rounds, systems taking
    turns in rotating order. No other runtime's thread pool shares the process, which the
    in-process blocks cannot rule out (see the report)."""
    common = {
        "tools": str(Path(__file__).parent),
        "threads": THREADS,
        "records": records,
        "warmup": cfg["warmup"],
    }
    args = {
        "peft": {
            "system": "peft",
            "spec": spec.name,
            "model": str(b.model_dir),
            "adapter": str(b.adapter),
            "labels": b.labels,
            "label_ids": b.label_ids,
        },
        "ptedge_fp32": {"system": "ptedge", "bundle": str(b.bundle_fp32)},
        "ptedge_int8": {"system": "ptedge", "bundle": str(b.bundle_int8)},
        **{n: {"system": "ptedge", "bundle": str(path)} for n, path in b.extra.items()},
    }
    times: dict[str, list[float]] = {n: [] for n in systems_of(b)}
    for rnd in range(cfg["alone_rounds"]):
        for n in _rotations(list(systems_of(b)), rnd):
            out = subprocess.run(
                [sys.executable, "-c", ALONE_CHILD, json.dumps({**common, **args[n]})],
                capture_output=True,
                text=True,
                cwd=bc.ROOT,
            )
            if out.returncode != 0:
                tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"latency child {n} failed: {tail[0]}")
            times[n] += json.loads(out.stdout.strip().splitlines()[-1])
    return times


# -- training throughput ---------------------------------------------------------------------


def _ptedge_step_s(run: Path, batch: int, skip: int) -> list[float]:
    rows = [json.loads(x) for x in (run / "timing.jsonl").read_text().splitlines() if x]
    return [batch / r["samples_per_s"] for r in rows if "samples_per_s" in r and r["step"] > skip]


def measure_training(spec: Spec, b: Built, cfg: dict, work: Path) -> dict:
    import torch

    from ptedge.train import train

    w, m = cfg["train_warmup"], cfg["train_measured"]
    steps = w + m
    tok = bc.hf_tokenizer(b.model_dir)
    examples = peft_examples(spec, tok, b.labels)
    variants = ["ptedge_fp32", "peft"] + (["ptedge_bf16"] if cfg["bf16"] else [])
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(cfg["train_rounds"]):
        for v in _rotations(variants, rnd):
            if v.startswith("ptedge"):
                out = work / f"train-{v}"
                args = _train_args(
                    spec,
                    b.model_dir,
                    out,
                    spec.template,
                    steps,
                    log_every=1,
                    dtype="bf16" if v == "ptedge_bf16" else "fp32",
                )
                train(args, progress=False)
                times = _ptedge_step_s(out, spec.train_batch, w)
            else:
                pm = bc.peft_new(spec.kind, b.model_dir, spec.n_virtual, len(b.labels))
                res = bc.peft_train(
                    pm,
                    peft_task(spec, tok, b.label_ids),
                    examples,
                    steps=steps,
                    batch_size=spec.train_batch,
                )
                times = res["step_s"][w:]
                del pm
            rate = spec.train_batch * len(times) / sum(times)
            rates[v].append(rate)
            bc.log(f"train {spec.name} {v}: {rate:.1f} samples/s")
    torch.set_num_threads(THREADS)
    out = {v: {"samples_per_s": sorted(r)[len(r) // 2], "rounds": r} for v, r in rates.items()}
    out["batch_size"] = spec.train_batch
    out["warmup_steps"], out["measured_steps"] = w, m
    return out


# -- one backbone ----------------------------------------------------------------------------


def bench_model(spec: Spec, cache: bc.Cache, cfg: dict, times: dict) -> dict:
    import numpy as np

    from ptedge.data import read_records

    with bc.Timer(times, f"{spec.name}: build"):
        b = build(spec, cache, cfg)
    test = read_records(spec.test)
    n_lat = cfg["latency_n"] + cfg["warmup"]
    lat_recs = [{spec.field: r[spec.field]} for r in bc.subsample(test, n_lat, seed=1)]
    tput_recs = [{spec.field: r[spec.field]} for r in bc.subsample(test, cfg["tput_records"], 2)]
    batches = [tput_recs[i : i + BATCH] for i in range(0, len(tput_recs), BATCH)]
    res: dict = {"task": spec.task, "backbone": spec.backbone, "template": spec.template}
    peft_text = spec.peft_format.replace("{}", "{" + spec.field + "}")
    res["peft_input"] = f"{spec.n_virtual} virtual tokens + {peft_text!r}"

    with bc.Timer(times, f"{spec.name}: latency and throughput"):
        systems = {
            "peft": PeftSystem(spec, b),
            "ptedge_fp32": PtedgeSystem(b.bundle_fp32),
            "ptedge_int8": PtedgeSystem(b.bundle_int8),
            **{n: PtedgeSystem(path) for n, path in b.extra.items()},
        }
        one = {n: (lambda r, s=s: s.predict([r])) for n, s in systems.items()}
        lat = alternate_latency(one, lat_recs, cfg["warmup"])
        res["latency_b1_interleaved_p50_ms"] = interleaved_latency(one, lat_recs[cfg["warmup"] :])
        tput = alternate_throughput(
            {n: s.predict for n, s in systems.items()}, batches, cfg["tput_repeats"]
        )
        probe = lat_recs[cfg["warmup"] :]
        sys_res = {
            n: {
                "latency_b1_ms": lat_summary(lat[n]),
                "throughput_b32": tput[n],
                "tokens_mean": float(np.mean([s.tokens(r) for r in probe])),
            }
            for n, s in systems.items()
        }
        peft_sys, fp32_sys = systems["peft"], systems["ptedge_fp32"]
        agree = [
            peft_sys.predict([r])[0]["label"] == fp32_sys.predict([r])[0]["label"]
            for r in probe[:20]
        ]
        res["labels_peft_eq_ptedge_fp32"] = sum(agree) / max(1, len(agree))  # both trained briefly

    with bc.Timer(times, f"{spec.name}: runtime overhead"):
        res["runtime_overhead"] = {}
        for n in ("ptedge_fp32", "ptedge_int8"):
            s = systems[n]
            pre = [s.feeds([r]) for r in lat_recs]
            idx = list(range(len(lat_recs)))
            t = alternate_latency(
                {
                    "predict": lambda i, s=s: s.predict([lat_recs[i]]),
                    "session_run": lambda i, s=s, pre=pre: s.run(pre[i]),
                },
                idx,
                cfg["warmup"],
            )
            p50 = {k: bc.percentile(v, 50) * 1000 for k, v in t.items()}
            res["runtime_overhead"][n] = {
                "predict_ms": lat_summary(t["predict"]),
                "session_run_ms": lat_summary(t["session_run"]),
                "ratio_p50": p50["predict"] / p50["session_run"],
            }

    with bc.Timer(times, f"{spec.name}: prompt overhead"):
        res["prompt_overhead"] = prompt_overhead(spec, b, systems, lat_recs, batches, cfg)

    if b.full_logits is not None:
        with bc.Timer(times, f"{spec.name}: task graph vs full logits"):
            res["full_logits"] = full_logits(b, systems["ptedge_fp32"], lat_recs, batches, cfg)
    del systems
    if spec.kind == "causal":
        with bc.Timer(times, f"{spec.name}: bundle formats"):
            res["formats"] = causal_formats(spec, b, cache, cfg, lat_recs, batches)

    with bc.Timer(times, f"{spec.name}: cold start"):
        cold = measure_cold(spec, b, lat_recs[-1], cfg["cold_repeats"])
    with bc.Timer(times, f"{spec.name}: latency alone in a process"):
        alone = alone_latency(spec, b, lat_recs, cfg)
    res["alone_rounds"] = cfg["alone_rounds"]
    with bc.Timer(times, f"{spec.name}: training throughput"):
        res["training"] = measure_training(spec, b, cfg, cache.work / spec.name)

    runtime_pkgs = {
        "peft": bc.package_closure_bytes(["torch", "transformers", "peft"]),
        "ptedge": bc.package_closure_bytes(["onnxruntime", "tokenizers", "numpy", "click"]),
    }
    sizes = {
        "peft": bc.folder_bytes(b.model_dir, list(bc.BACKBONE_SHIPPED))
        + bc.folder_bytes(b.adapter),
        "ptedge_fp32": bc.folder_bytes(b.bundle_fp32),
        "ptedge_int8": bc.folder_bytes(b.bundle_int8),
        **{n: bc.folder_bytes(path) for n, path in b.extra.items()},
    }
    for n in systems_of(b):
        sys_res[n]["latency_b1_alone_ms"] = lat_summary(alone[n])
        sys_res[n]["cold_start_s"] = cold[n]["s"]
        sys_res[n]["cold_peak_rss_mb"] = cold[n]["peak_rss_mb"]
        sys_res[n]["cold_runs"] = cold[n]["runs"]
        sys_res[n]["size_mb"] = sizes[n] / 1e6
        pk = runtime_pkgs["peft" if n == "peft" else "ptedge"]
        sys_res[n]["runtime_packages_mb"] = pk["bytes"] / 1e6
    res["runtime_packages"] = {k: v["packages"] for k, v in runtime_pkgs.items()}
    res["systems"] = sys_res
    res["int8"] = int8_summary(b)
    res["ratios_peft_over_int8"] = ratios(sys_res, res["training"])
    res["quantized"] = quantized_summary(b, sys_res)
    return res


def prompt_overhead(spec, b: Built, systems, lat_recs, batches, cfg) -> dict:
    """Fused bundle against the same backbone exported without prompts, same token count.

    With an A/A control: a second session on the no-prompt bundle, timed in the same
    rotation, whose difference from the first is pure measurement noise (the two graphs
    differ only in the embedding table's extra prompt rows, which ``same_graph`` checks).
    """
    out = {}
    pairs = [
        ("fp32", systems["ptedge_fp32"], b.noprompt_fp32),
        ("int8", systems["ptedge_int8"], b.noprompt_int8),
    ]
    for prec, prompted, plain_dir in pairs:
        if plain_dir is None:
            continue
        plain, again = PtedgeSystem(plain_dir), PtedgeSystem(plain_dir)
        vocab = prompted.p.manifest["backbone"]["vocab_size"]
        filler = plain.p.tokenizer.encode("the", add_special_tokens=False).ids[0]

        def swap(feeds, vocab=vocab, filler=filler):
            ids = feeds["input_ids"].copy()
            ids[ids >= vocab] = filler
            return {**feeds, "input_ids": ids}

        pre = [prompted.feeds([r]) for r in lat_recs]
        fns = {
            "prompted": lambda i, pre=pre, s=prompted: s.run(pre[i]),
            "no_prompt": lambda i, pre=pre, s=plain: s.run(swap(pre[i])),
            "no_prompt_again": lambda i, pre=pre, s=again: s.run(swap(pre[i])),
        }
        t = alternate_latency(fns, list(range(len(pre))), cfg["warmup"])
        bfeeds = [prompted.feeds(bt) for bt in batches]
        tp = _tput_feeds(prompted, plain, bfeeds, swap, cfg["tput_repeats"])
        p50 = {k: bc.percentile(v, 50) * 1000 for k, v in t.items()}
        out[prec] = {
            "prompted_b1_ms": lat_summary(t["prompted"]),
            "no_prompt_b1_ms": lat_summary(t["no_prompt"]),
            "b1_overhead_pct": 100 * (p50["prompted"] / p50["no_prompt"] - 1),
            "aa_b1_ms": lat_summary(t["no_prompt_again"]),
            "aa_b1_pct": 100 * (p50["no_prompt_again"] / p50["no_prompt"] - 1),
            "prompted_b32_per_s": tp["prompted"],
            "no_prompt_b32_per_s": tp["no_prompt"],
            "b32_overhead_pct": 100 * (tp["no_prompt"] / tp["prompted"] - 1),
            "prompt_tokens": prompted.p.manifest["tasks"][prompted.name]["pseudo_ids"][1],
            "no_prompt_bundle_mb": bc.folder_bytes(plain_dir) / 1e6,
            "same_graph": graph_difference(prompted.p, plain.p),
        }
        del plain, again
    return out


def graph_difference(a, b) -> dict:
    """What differs between two Predictors' bundle graphs: node counts by op type (equal or
    not) and the initializers whose shapes differ (name: [shape in a, shape in b])."""
    import collections

    import onnx

    graphs = [
        onnx.load(str(p.bundle / p.manifest["model"]), load_external_data=False).graph
        for p in (a, b)
    ]
    ops = [collections.Counter(n.op_type for n in g.node) for g in graphs]
    shapes = [{i.name: list(i.dims) for i in g.initializer} for g in graphs]
    return {
        "ops_equal": ops[0] == ops[1],
        "nodes": [sum(c.values()) for c in ops],
        "initializer_shapes_differ": {
            n: [shapes[0][n], shapes[1].get(n)]
            for n in shapes[0]
            if shapes[0][n] != shapes[1].get(n)
        },
    }


def _noise_note(po: dict) -> str:
    """The prompt-overhead line's A/A control and graph comparison, for the report."""
    g = po["same_graph"]
    rows = "; ".join(f"`{n}` {a} vs {b}" for n, (a, b) in g["initializer_shapes_differ"].items())
    same = "same ops" if g["ops_equal"] else "DIFFERENT ops"
    return (
        f" A/A control (a second no-prompt session in the same rotation): batch 1 "
        f"{po['aa_b1_pct']:+.1f}%, the measurement's own noise. Graphs: {same} "
        f"({g['nodes'][0]} vs {g['nodes'][1]} nodes); shapes that differ: {rows or 'none'}."
    )


def _tput_feeds(a, b, feeds: list[dict], swap, repeats: int) -> dict:
    """samples/s of two sessions over the same pre-encoded batches, alternating."""
    n = sum(len(f["input_ids"]) for f in feeds)
    fns = {
        "prompted": lambda: [a.run(f) for f in feeds],
        "no_prompt": lambda: [b.run(swap(f)) for f in feeds],
    }
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        for k in _rotations(list(fns), rep):
            t0 = time.perf_counter()
            fns[k]()
            rates[k].append(n / (time.perf_counter() - t0))
    return {k: sorted(v)[len(v) // 2] for k, v in rates.items()}


def full_logits(b: Built, task_sys: PtedgeSystem, lat_recs, batches, cfg) -> dict:
    """ptedge's task graph (prompted ids) against a (B, T, V)-logits graph on the same
    number of tokens (pseudo ids replaced by an ordinary token), both fp32, same options."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    full = ort.InferenceSession(
        str(b.full_logits / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in full.get_inputs()]
    vocab = task_sys.p.manifest["backbone"]["vocab_size"]
    filler = task_sys.p.tokenizer.encode(" the", add_special_tokens=False).ids[0]

    def full_feeds(f):
        ids = f["input_ids"].copy()
        ids[ids >= vocab] = filler
        mask = f["attention_mask"]
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in names:
            feeds["position_ids"] = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int64)
        return {k: v for k, v in feeds.items() if k in names}

    pre = [task_sys.feeds([r]) for r in lat_recs]
    t = alternate_latency(
        {
            "task_graph": lambda i: task_sys.run(pre[i]),
            "full_logits": lambda i: full.run(["logits"], full_feeds(pre[i])),
        },
        list(range(len(pre))),
        cfg["warmup"],
    )
    bfeeds = [task_sys.feeds(bt) for bt in batches]
    n = sum(len(bt) for bt in batches)
    rates: dict[str, list[float]] = {"task_graph": [], "full_logits": []}
    out_bytes = {}
    run = {
        "task_graph": lambda f: task_sys.run(f),
        "full_logits": lambda f: full.run(["logits"], full_feeds(f)),
    }
    for k, fn in run.items():
        out_bytes[k] = int(sum(o.nbytes for o in fn(bfeeds[0])))
    for rep in range(cfg["tput_repeats"]):
        for k in _rotations(list(run), rep):
            t0 = time.perf_counter()
            for f in bfeeds:
                run[k](f)
            rates[k].append(n / (time.perf_counter() - t0))
    p50 = {k: bc.percentile(v, 50) * 1000 for k, v in t.items()}
    return {
        "full_graph": "optimum main_export(task='text-generation'), fp32, no KV cache",
        "task_graph_b1_ms": lat_summary(t["task_graph"]),
        "full_logits_b1_ms": lat_summary(t["full_logits"]),
        "b1_ratio_full_over_task": p50["full_logits"] / p50["task_graph"],
        "task_graph_b32_per_s": sorted(rates["task_graph"])[len(rates["task_graph"]) // 2],
        "full_logits_b32_per_s": sorted(rates["full_logits"])[len(rates["full_logits"]) // 2],
        "output_bytes_b32": out_bytes,
        "full_graph_mb": bc.folder_bytes(b.full_logits, ["model.onnx", "model.onnx_data"]) / 1e6,
    }


def int8_summary(b: Built) -> dict:
    from ptedge.runtime import load_manifest

    m8 = load_manifest(b.bundle_int8, verify=False)
    q = m8.get("quantization") or {}
    guard = q.get("guard") or {}
    g = next(iter(guard.values()), {})
    fp32_mb = bc.folder_bytes(b.bundle_fp32) / 1e6
    int8_mb = bc.folder_bytes(b.bundle_int8) / 1e6
    drop = None
    if "fp32_accuracy" in g:
        drop = 100 * (g["fp32_accuracy"] - g["quantized_accuracy"])
    return {
        "size_fraction_of_fp32": int8_mb / fp32_mb,
        "guard": g,
        "accuracy_drop_points": drop,
        "method": q.get("method"),
        "recipe": q.get("recipe"),
        "guard_max_drop_points": q.get("max_drop_points"),
    }


def quantized_summary(b: Built, s: dict) -> dict:
    """Each quantized ptedge system: its recipe, size, guard accuracy, and PEFT's batch-1
    p50 (in-process and alone) over its own."""
    from ptedge.runtime import load_manifest

    out = {}
    bundles = {"ptedge_int8": b.bundle_int8, **b.extra}
    for n, path in bundles.items():
        q = load_manifest(path, verify=False).get("quantization") or {}
        g = next(iter((q.get("guard") or {}).values()), {})
        out[n] = {
            "recipe": q.get("recipe"),
            "size_mb": s[n]["size_mb"],
            "fp32_accuracy": g.get("fp32_accuracy"),
            "quantized_accuracy": g.get("quantized_accuracy"),
            "peft_over_p50": s["peft"]["latency_b1_ms"]["p50"] / s[n]["latency_b1_ms"]["p50"],
            "peft_over_alone_p50": s["peft"]["latency_b1_alone_ms"]["p50"]
            / s[n]["latency_b1_alone_ms"]["p50"],
        }
    return out


def ratios(s: dict, training: dict) -> dict:
    peft, i8 = s["peft"], s["ptedge_int8"]
    return {
        "latency_p50": peft["latency_b1_ms"]["p50"] / i8["latency_b1_ms"]["p50"],
        "latency_p90": peft["latency_b1_ms"]["p90"] / i8["latency_b1_ms"]["p90"],
        "alone_p50": peft["latency_b1_alone_ms"]["p50"] / i8["latency_b1_alone_ms"]["p50"],
        "alone_p90": peft["latency_b1_alone_ms"]["p90"] / i8["latency_b1_alone_ms"]["p90"],
        "throughput_b32": i8["throughput_b32"] / peft["throughput_b32"],
        "cold_start": peft["cold_start_s"] / i8["cold_start_s"],
        "peak_rss": peft["cold_peak_rss_mb"] / i8["cold_peak_rss_mb"],
        "size": peft["size_mb"] / i8["size_mb"],
        "runtime_packages": peft["runtime_packages_mb"] / i8["runtime_packages_mb"],
        "training_ptedge_over_peft": training["ptedge_fp32"]["samples_per_s"]
        / training["peft"]["samples_per_s"],
    }


# -- causal LMs: bundle formats -------------------------------------------------------------

# name -> (quantize, graph): the previous format (traced graphs, ptedge <= 0.1) and int4
FORMATS = {
    "trace_fp32": (None, "trace"),
    "trace_int8": ("int8", "trace"),
    "int4": ("int4", "auto"),
}


def causal_formats(spec: Spec, b: Built, cache: bc.Cache, cfg: dict, lat_recs, batches) -> dict:
    """SmolLM2: today's bundles (onnxruntime-genai's builder graph: fp32, int8) against the
    previous format (TorchScript graph, ``--graph trace``: fp32, int8) and int4, batch-1
    latency each alone in a fresh process (PEFT's from ``alone_latency``), batch-32
    throughput taking turns in one process, graph node counts, sizes, guard accuracy, and
    test accuracy of fp32, int8 and int4 (``test_max`` records of the test split)."""
    import collections

    import onnx

    from ptedge.data import read_records
    from ptedge.runtime import Predictor, load_manifest

    work = cache.work / spec.name
    base = {"backbone": spec.backbone, "template": spec.template}
    bundles = {"fp32": b.bundle_fp32, "int8": b.bundle_int8}
    for name, (quant, graph) in FORMATS.items():
        out = work / f"bundle-{name}"
        params = {**base, "quantize": quant, "graph": graph, "eval_max": cfg["eval_max"]}
        bundles[name] = cache.get(
            out,
            params | {"export": bc.EXPORT_REV},
            lambda out=out, quant=quant, graph=graph: _export(
                b.run, out, quant, spec, cfg["eval_max"], graph
            ),
            "ptedge.json",
        )
    res: dict = {}
    for name, folder in bundles.items():
        m = load_manifest(folder, verify=False)
        model = onnx.load(str(folder / m["model"]), load_external_data=False)
        ops = collections.Counter(n.op_type for n in model.graph.node)
        q = m.get("quantization") or {}
        g = next(iter((q.get("guard") or {}).values()), {})
        res[name] = {
            "nodes": len(model.graph.node),
            "ops": dict(ops.most_common(6)),
            "size_mb": bc.folder_bytes(folder) / 1e6,
            "recipe": q.get("recipe"),
            "guard": g,
        }
    test = bc.subsample(read_records(spec.test), cfg["test_max"], seed=3)
    for name in ("fp32", "int8", "int4"):  # the goal: <= 1 point of test accuracy lost
        p = Predictor(bundles[name], threads=THREADS)
        res[name]["test_accuracy"] = p.evaluate(test, batch_size=BATCH) | {"file": spec.test.name}
    names = list(bundles)
    args = {n: {"system": "ptedge", "bundle": str(bundles[n])} for n in names}
    common = {
        "tools": str(Path(__file__).parent),
        "threads": THREADS,
        "records": lat_recs,
        "warmup": cfg["warmup"],
    }
    alone: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(cfg["alone_rounds"]):
        for n in _rotations(names, rnd):
            out = subprocess.run(
                [sys.executable, "-c", ALONE_CHILD, json.dumps({**common, **args[n]})],
                capture_output=True,
                text=True,
                cwd=bc.ROOT,
            )
            if out.returncode != 0:
                tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"latency child {n} failed: {tail[0]}")
            alone[n] += json.loads(out.stdout.strip().splitlines()[-1])
    systems = {n: PtedgeSystem(bundles[n]) for n in names}
    tput = alternate_throughput(
        {n: s.predict for n, s in systems.items()}, batches, cfg["tput_repeats"]
    )
    for n in names:
        res[n]["latency_b1_alone_ms"] = lat_summary(alone[n])
        res[n]["throughput_b32"] = tput[n]
    return res


# -- reports --------------------------------------------------------------------------------

LABELS = {
    "peft": "PEFT (PyTorch)",
    "ptedge_fp32": "ptedge fp32",
    "ptedge_int8": "ptedge int8",
    "ptedge_int4": "ptedge int4",
    "ptedge_int8_dynamic": "ptedge int8, previous recipe",
}
COLORS = {
    "peft": "tab:red",
    "ptedge_fp32": "tab:blue",
    "ptedge_int8": "tab:green",
    "ptedge_int4": "tab:olive",
    "ptedge_int8_dynamic": "tab:gray",
}

GOALS = [  # (ratio key, goal, text) on MiniLM
    ("latency_p50", 5.0, "batch-1 latency ≥ 5×"),
    ("cold_start", 10.0, "cold start ≥ 10×"),
    ("peak_rss", 4.0, "peak memory ≥ 4×"),
    ("training_ptedge_over_peft", 1.0, "training throughput ≥ PEFT's (aim 1.5×)"),
]


def markdown(result: dict) -> str:
    f = bc.fmt
    lines = [
        "# Speed and size: PEFT P-tuning (PyTorch) vs ptedge bundles (onnxruntime)",
        "",
        f"Machine: {bc.machine_line(result['machine'])}.",
        f"Mode: {'quick (smoke test sizes, not for comparison)' if result['quick'] else 'full'}; "
        f"wall time {result['wall_s'] / 60:.1f} min; {result['threads']} threads per system; "
        f"command: `{result['command']}`.",
        "",
    ]
    for note in (bc.busy_note(result["machine"]), bc.reuse_note(result.get("reused", []))):
        if note:
            lines += [note, ""]
    for r in result["models"].values():
        s = r["systems"]
        names = list(s)
        lines += [
            f"## {r['backbone']} on {r['task']}",
            "",
            f"ptedge template `{r['template']!r}`; PEFT input: {r['peft_input']}.",
            "",
        ]
        if "measured" in r:
            m = r["measured"]
            lines += [f"Measured {m['date']} (git {m['commit']}): `{m['command']}`.", ""]
        lines += [
            "| | " + " | ".join(LABELS[n] for n in names) + " | PEFT ÷ ptedge int8 |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        ra = r["ratios_peft_over_int8"]
        rows = [
            ("batch-1 latency p50 (ms)", lambda x: x["latency_b1_ms"]["p50"], 2, "latency_p50"),
            ("batch-1 latency p90 (ms)", lambda x: x["latency_b1_ms"]["p90"], 2, "latency_p90"),
            (
                "batch-1 latency p50, alone in a process (ms) ²",
                lambda x: x["latency_b1_alone_ms"]["p50"],
                2,
                "alone_p50",
            ),
            (
                "batch-1 latency p90, alone in a process (ms) ²",
                lambda x: x["latency_b1_alone_ms"]["p90"],
                2,
                "alone_p90",
            ),
            (
                "throughput, batch 32 (samples/s) ¹",
                lambda x: x["throughput_b32"],
                1,
                "throughput_b32",
            ),
            ("cold start to first prediction (s)", lambda x: x["cold_start_s"], 2, "cold_start"),
            ("cold-start peak RSS (MB)", lambda x: x["cold_peak_rss_mb"], 0, "peak_rss"),
            ("shipped model files (MB)", lambda x: x["size_mb"], 1, "size"),
            (
                "runtime Python packages (MB)",
                lambda x: x["runtime_packages_mb"],
                0,
                "runtime_packages",
            ),
            ("tokens per sentence (mean)", lambda x: x["tokens_mean"], 1, None),
        ]
        for label, get, d, key in rows:
            cells = [f(float(get(s[n])), d) for n in names]
            ratio = f"{ra[key]:.2f}×" if key else ""
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
        tr = r["training"]
        bf = tr.get("ptedge_bf16", {}).get("samples_per_s")
        il = r.get("latency_b1_interleaved_p50_ms")
        lines += [
            "",
            "¹ for throughput the ratio is ptedge int8 ÷ PEFT (higher is better for ptedge, "
            "like every other ratio).",
            f"² each system in its own fresh process, one after another ({r['alone_rounds']} "
            "round(s), same sentences and warm-up), as an app runs it: no other runtime's "
            "thread pool in the process.",
            "",
            f"- Batch-1 latency is timed in blocks of {BLOCK} calls per system (turns rotate "
            "between blocks), so no system runs beside another's still-spinning worker threads."
            + (
                " With turns after every call instead, p50 is "
                + ", ".join(f"{n} {f(il[n], 2)} ms" for n in names)
                + f" (PEFT ÷ int8 {il['peft'] / il['ptedge_int8']:.2f}×)."
                if il
                else ""
            ),
            f"- Training throughput, batch {tr['batch_size']} ({tr['measured_steps']} steps "
            f"after {tr['warmup_steps']} warm-up): ptedge "
            f"{f(tr['ptedge_fp32']['samples_per_s'], 1)} samples/s, "
            f"PEFT {f(tr['peft']['samples_per_s'], 1)} samples/s "
            f"(ptedge ÷ PEFT {ra['training_ptedge_over_peft']:.2f}×)"
            + (f"; ptedge with a bf16 backbone {f(bf, 1)} samples/s" if bf else "")
            + ".",
        ]
        i8 = r["int8"]
        g = i8["guard"]
        lines.append(
            f"- int8 bundle (recipe `{i8.get('recipe')}`) = "
            f"{100 * i8['size_fraction_of_fp32']:.0f}% of the fp32 bundle's size; export "
            f"guard accuracy fp32 {f(g.get('fp32_accuracy'))} → int8 "
            f"{f(g.get('quantized_accuracy'))} on {g['data']['n']} records of "
            f"`{g['data']['file']}` ({f(i8['accuracy_drop_points'], 2)} points "
            "lost; briefly trained prompts: see quality.md for trained accuracy)."
        )
        for n, q in r.get("quantized", {}).items():
            lines.append(
                f"- {LABELS[n]} (recipe `{q['recipe']}`): {f(q['size_mb'], 1)} MB; PEFT ÷ it, "
                f"batch-1 p50 {q['peft_over_p50']:.2f}× (alone in a process "
                f"{q['peft_over_alone_p50']:.2f}×)"
                + (
                    f"; export guard accuracy fp32 {f(q['fp32_accuracy'])} → "
                    f"{f(q['quantized_accuracy'])}."
                    if q["quantized_accuracy"] is not None
                    else "."
                )
            )
        if "ptedge_int8_dynamic" in s:
            old, new = s["ptedge_int8_dynamic"], s["ptedge_int8"]
            lines.append(
                "- Previous int8 recipe ÷ this int8, batch-1 p50: "
                f"{old['latency_b1_ms']['p50'] / new['latency_b1_ms']['p50']:.2f}× in-process, "
                f"{old['latency_b1_alone_ms']['p50'] / new['latency_b1_alone_ms']['p50']:.2f}× "
                "alone in a process (above 1: this recipe is faster)."
            )
        for prec, po in r["prompt_overhead"].items():
            lines.append(
                f"- Prompt overhead ({prec}, bare `session.run`, same {po['prompt_tokens']}-token-"
                f"longer ids): batch 1 p50 {f(po['prompted_b1_ms']['p50'], 2)} ms fused vs "
                f"{f(po['no_prompt_b1_ms']['p50'], 2)} ms without prompts "
                f"({po['b1_overhead_pct']:+.1f}%); batch 32 {po['b32_overhead_pct']:+.1f}%."
                + _noise_note(po)
            )
        for prec, ro in r["runtime_overhead"].items():
            lines.append(
                f"- Runtime overhead ({prec}): `Predictor.predict` batch 1 p50 "
                f"{f(ro['predict_ms']['p50'], 2)} ms vs `session.run` on pre-encoded ids "
                f"{f(ro['session_run_ms']['p50'], 2)} ms ({ro['ratio_p50']:.2f}×)."
            )
        fl = r.get("full_logits")
        if fl:
            ob = fl["output_bytes_b32"]
            lines.append(
                f"- Task graph vs full-logits graph ({fl['full_graph']}): batch 1 p50 "
                f"{f(fl['task_graph_b1_ms']['p50'], 2)} vs "
                f"{f(fl['full_logits_b1_ms']['p50'], 2)} ms "
                f"({fl['b1_ratio_full_over_task']:.2f}×); batch 32 "
                f"{f(fl['task_graph_b32_per_s'], 1)} vs {f(fl['full_logits_b32_per_s'], 1)} "
                f"samples/s; output per batch of 32: {ob['task_graph'] / 1e3:.1f} kB vs "
                f"{ob['full_logits'] / 1e6:.0f} MB."
            )
        lines += _formats_markdown(r)
        lines.append("")
    mini = result["models"].get("minilm")
    if mini:
        ra = mini["ratios_peft_over_int8"]
        lines += [
            "## Goals (MiniLM, PEFT ÷ ptedge int8)",
            "",
            "| goal | measured | met |",
            "|---|---:|:---:|",
        ]
        for key, goal, text in GOALS:
            lines.append(f"| {text} | {ra[key]:.2f}× | {'yes' if ra[key] >= goal else 'no'} |")
        i8 = mini["int8"]
        frac = i8["size_fraction_of_fp32"]
        lines.append(
            f"| int8 bundle ≤ 30% of fp32 | {100 * frac:.0f}% | {'yes' if frac <= 0.30 else 'no'} |"
        )
        drop = i8["accuracy_drop_points"]
        lines.append(
            f"| int8 loses ≤ 1 point (export guard) | {bc.fmt(drop, 2)} | "
            f"{'—' if drop is None else 'yes' if round(drop, 9) <= 1 else 'no'} |"
        )
        for prec, po in mini["prompt_overhead"].items():
            ok = po["b1_overhead_pct"] <= 3
            lines.append(
                f"| prompt overhead ≤ 3% ({prec}, batch 1) | "
                f"{po['b1_overhead_pct']:+.1f}% (A/A {po['aa_b1_pct']:+.1f}%) | "
                f"{'yes' if ok else 'no'} |"
            )
        for prec, ro in mini["runtime_overhead"].items():
            ok = ro["ratio_p50"] <= 1.2
            lines.append(
                f"| runtime overhead ≤ 1.2× ({prec}) | {ro['ratio_p50']:.2f}× | "
                f"{'yes' if ok else 'no'} |"
            )
        lines.append("")
    parts = ", ".join(f"{k} {v}" for k, v in result["timings"].items())
    lines += [f"Wall time per part (s): {parts}.", ""]
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        ("batch-1 latency p50 (ms, log)", lambda s: s["latency_b1_ms"]["p50"]),
        ("throughput batch 32 (samples/s, log)", lambda s: s["throughput_b32"]),
        ("cold start (s)", lambda s: s["cold_start_s"]),
        ("cold-start peak RSS (MB)", lambda s: s["cold_peak_rss_mb"]),
        ("shipped model files (MB)", lambda s: s["size_mb"]),
    ]
    models = list(result["models"])
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    names = list(dict.fromkeys(n for m in models for n in result["models"][m]["systems"]))
    x = np.arange(len(models))
    wdt = 0.8 / len(names)
    for ax, (title, get) in zip(axes.flat[:5], panels, strict=True):
        for k, n in enumerate(names):
            got = [result["models"][m]["systems"].get(n) for m in models]
            vals = [get(g) if g else 0 for g in got]
            ax.bar(x + (k - (len(names) - 1) / 2) * wdt, vals, wdt, label=n, color=COLORS[n])
        ax.set_xticks(x, models)
        ax.set_title(title, fontsize=10)
        if "log" in title:
            ax.set_yscale("log")
    ax = axes.flat[5]
    variants = ["peft", "ptedge_fp32", "ptedge_bf16"]
    for k, v in enumerate(variants):
        vals = [result["models"][m]["training"].get(v, {}).get("samples_per_s", 0) for m in models]
        ax.bar(
            x + (k - 1) * wdt,
            vals,
            wdt,
            label=v,
            color={"peft": "tab:red", "ptedge_fp32": "tab:blue", "ptedge_bf16": "tab:purple"}[v],
        )
    ax.set_xticks(x, models)
    ax.set_title("training throughput (samples/s, log)", fontsize=10)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    axes.flat[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"PEFT vs ptedge, {result['threads']} threads — {m['cpu']}, {m['date'][:10]}"
        + (" (quick mode)" if result["quick"] else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _formats_markdown(r: dict) -> list[str]:
    """The causal-LM bundle-format table (``causal_formats``), with the goal row."""
    fm = r.get("formats")
    if not fm:
        return []
    f = bc.fmt
    peft = r["systems"]["peft"]
    lines = [
        "",
        "Bundle formats (`trace_*`: the previous TorchScript graphs, `--graph trace`; the "
        "others: onnxruntime-genai's builder graph with the prompt rows and heads grafted "
        "in). Latency: each alone in a fresh process, batch 1.",
        "",
        "| bundle | graph nodes | size (MB) | recipe | guard fp32 → quantized | test accuracy "
        "| p50 / p90 (ms) | PEFT ÷ bundle (p50) | batch 32 (samples/s) |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for n, x in fm.items():
        g = x["guard"]
        q = next(
            (v for k, v in g.items() if k.endswith("_accuracy") and k != "fp32_accuracy"), None
        )
        lat = x["latency_b1_alone_ms"]
        lines.append(
            f"| {n} | {x['nodes']} | {x['size_mb']:.1f} | {x['recipe'] or '—'} | "
            + (f"{f(g.get('fp32_accuracy'))} → {f(q)}" if g else "—")
            + f" | {f(x['test_accuracy']['accuracy']) if 'test_accuracy' in x else '—'}"
            + f" | {f(lat['p50'], 2)} / {f(lat['p90'], 2)} | "
            f"{peft['latency_b1_alone_ms']['p50'] / lat['p50']:.2f}× | "
            f"{f(x['throughput_b32'], 1)} |"
        )
    p50 = {n: x["latency_b1_alone_ms"]["p50"] for n, x in fm.items()}
    best = min(("int8", "int4"), key=p50.get)
    ratio = peft["latency_b1_alone_ms"]["p50"] / p50[best]
    test = {n: fm[n]["test_accuracy"] for n in ("fp32", best)}
    lost = 100 * (test["fp32"]["accuracy"] - test[best]["accuracy"])
    lines += [
        "",
        f"Goal: batch 1 alone, {best} ≥ 5× PEFT: {ratio:.2f}× "
        f"({'met' if ratio >= 5 else 'not met'}); "
        f"vs the previous int8 format: {p50['trace_int8'] / p50[best]:.2f}× faster. "
        f"Test accuracy ({test['fp32']['n']} records of `{test['fp32']['file']}`): fp32 "
        f"{f(test['fp32']['accuracy'])}, {best} {f(test[best]['accuracy'])}, {lost:.2f} points "
        f"lost (goal ≤ 1: {'met' if lost <= 1 else 'not met'}).",
    ]
    return lines


def _earlier_models(path: Path, names: list[str], quick: bool) -> dict:
    """The other models' results of an earlier run in ``path`` (same mode), so that
    ``--models`` runs add up to one report; each says when and how it was measured."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("quick") != quick:
        return {}
    kept = {}
    for n, r in old.get("models", {}).items():
        if n not in names:
            r.setdefault(
                "measured",
                {
                    "date": old["machine"]["date"],
                    "commit": old["machine"]["git"]["commit"],
                    "command": old.get("command"),
                },
            )
            kept[n] = r
    return kept


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="minimal sizes (CI smoke test)")
    ap.add_argument("--out", default="docs/results", help="folder for speed.json/.md/.png")
    ap.add_argument("--models", default="minilm,smollm2", help="comma-separated subset")
    ap.add_argument(
        "--work", help="folder for built runs, bundles, adapters (default runs/bench/speed[-quick])"
    )
    ap.add_argument("--fresh", action="store_true", help="rebuild every artifact")
    ap.add_argument("--threads", type=int, default=2, help="threads per system (default 2)")
    ap.add_argument(
        "--build-only", action="store_true", help="build the runs, bundles and adapters, then stop"
    )
    a = ap.parse_args(argv)
    global THREADS
    THREADS = a.threads
    t_start = time.perf_counter()
    cpu0 = bc.cpu_mark()
    cfg = QUICK if a.quick else FULL
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    all_specs = specs()
    unknown = [n for n in names if n not in all_specs]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {sorted(all_specs)}")
    for n in names:
        bc.need_data(all_specs[n].train.parent.name)
    import torch

    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(a.work or bc.ROOT / "runs" / "bench" / ("speed-quick" if a.quick else "speed"))
    cache = bc.Cache(work, fresh=a.fresh)
    if a.build_only:
        for n in names:
            build(all_specs[n], cache, cfg)
        bc.log(f"built everything under {work} in {(time.perf_counter() - t_start) / 60:.1f} min")
        return
    out = Path(a.out)
    result: dict = {
        "benchmark": "speed",
        "quick": a.quick,
        "command": "python tools/bench_speed.py"
        + (" --quick" if a.quick else "")
        + (f" --models {a.models}" if a.models != "minilm,smollm2" else "")
        + (f" --threads {a.threads}" if a.threads != 2 else ""),
        "machine": bc.machine(),
        "threads": THREADS,
        "settings": cfg,
        "models": {},
        "timings": {},
    }
    for n in names:
        result["models"][n] = bench_model(all_specs[n], cache, cfg, result["timings"])
        result["models"][n]["measured"] = {
            "date": result["machine"]["date"],
            "commit": result["machine"]["git"]["commit"],
            "command": result["command"],
        }
    kept = _earlier_models(out / "speed.json", names, a.quick)
    merged = {**kept, **result["models"]}
    result["models"] = {n: merged[n] for n in all_specs if n in merged}
    result["wall_s"] = time.perf_counter() - t_start
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    result["machine"]["others_cpu_share"] = bc.others_cpu_share(cpu0)
    result["reused"] = cache.reused
    out.mkdir(parents=True, exist_ok=True)
    bc.write_json(out / "speed.json", result)
    (out / "speed.md").write_text(markdown(result))
    chart(result, out / "speed.png")
    bc.log(f"wrote {out / 'speed.json'}, speed.md, speed.png in {result['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
