"""Shared pieces of tools/bench_speed.py and tools/bench_quality.py.

What is here: the machine record (CPU, cores, versions, date, git revision) written into
every result file; an artifact cache (run folders, bundles, PEFT adapters are rebuilt only
when their parameters change); the shared data sets and the BANKING77 dev split carved
from train; the prompts every benchmark uses; and the PEFT side of the comparisons
(PromptEncoderConfig with the LSTM reparameterisation, a training loop with ptedge's
optimiser, schedule and batch sampling, and inference as users deploy it).

Not here: anything ptedge does itself; the benchmarks call ptedge only through its public
API (``TrainArgs``/``train``, ``ExportArgs``/``export``, ``Predictor``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# What ``ptedge export`` writes, as far as cached bundles are concerned: part of every
# bundle's cache parameters, so bump it when export output changes (bundles are rebuilt).
EXPORT_REV = (
    "9: static int8 with float outlier channels (weight-only blocks when the guard has too "
    "few records), int4, causal LM builder graphs, rejection with a margin, by distance or both"
)

# What ``ptedge train`` does with a linear head beyond its flags: part of the cache parameters
# of linear-head runs, so bump it when that changes (the runs are retrained).
LINEAR_HEAD_REV = (
    "4: the head refitted after training as a converged logistic regression, solved again "
    "with the carved dev records; the backbone's dropout on while the prompt trains"
)

# -- prompts shared by both benchmarks ----------------------------------------------------
# BANKING77 on MiniLM (linear head): 6 pseudo tokens around the text; PEFT gets 6 virtual
# tokens in front (its only placement).
B77_TEMPLATE = "[P:3] {text} [P:3] [MASK]"
B77_NO_PROMPT = "{text} [MASK]"
B77_VIRTUAL = 6
# SST-2 on SmolLM2: the manual prompt, and the same words after 10 pseudo tokens, the
# placement PEFT gets too (10 virtual tokens in front of the manual prompt's text). Chosen on
# dev: it beat "[P:5] Review: {sentence} [P:5]\nSentiment: [MASK]" (dev 0.900 vs 0.890 at
# 300 x 16, seed 0). Verbalizer as in the issue.
SST2_VERBALIZER = {"0": "negative", "1": "positive"}
SST2_MANUAL = "Review: {sentence}\nSentiment: [MASK]"
SST2_TEMPLATE = "[P:10] Review: {sentence}\nSentiment: [MASK]"
SST2_PEFT_TEXT = "Review: {sentence}\nSentiment:"
SST2_VIRTUAL = 10
# tokens the baselines (PEFT's sequence classifier, the probe) read of a text: the whole of
# it up to the encoder's 512 positions (less room for PEFT's virtual tokens), as ptedge's
# default --max-length reads every training record whole up to 512 tokens
BASELINE_TOKENS = 496
# LAMA on SmolLM2: the paper's P-tuning template; PEFT: 6 virtual tokens, then the subject.
LAMA_TEMPLATE = "[P:3] {sub_label} [P:3] [MASK]"
LAMA_VIRTUAL = 6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timer:
    """``with Timer(times, "name"):`` adds the block's wall seconds to ``times[name]``."""

    def __init__(self, times: dict, name: str):
        self.times, self.name = times, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        log(f"-- {self.name}")
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.times[self.name] = round(self.times.get(self.name, 0.0) + dt, 2)
        log(f"-- {self.name}: {dt:.1f} s")


# -- the machine ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "ptedge",
        "torch",
        "transformers",
        "peft",
        "onnxruntime",
        "onnx",
        "optimum",
        "optimum-onnx",
        "tokenizers",
        "numpy",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return {"commit": rev or None, "dirty": bool(dirty)}
    except OSError:
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """What the numbers were measured on; goes into every result file."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": _mem_gb(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "versions": versions(),
        "git": _git(),
    }


def _cpu_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has been busy (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()  # this process and its waited-for children (cold starts, training)
    return t.user + t.system + t.children_user + t.children_system


def cpu_mark() -> dict:
    """Machine-wide and own CPU time now; ``others_cpu_share`` compares against it."""
    return {"busy": _cpu_busy_s(), "own": _own_cpu_s(), "wall": time.monotonic()}


def others_cpu_share(mark: dict) -> float | None:
    """Share of the machine's CPU time since ``mark`` used by processes other than this
    benchmark and its children (0 = nothing else ran)."""
    busy = _cpu_busy_s()
    if busy is None or mark["busy"] is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    others = (busy - mark["busy"]) - (_own_cpu_s() - mark["own"])
    return max(0.0, others) / max(1e-9, (time.monotonic() - mark["wall"]) * (cores or 1))


def busy_note(m: dict) -> str | None:
    """A warning when other work shared the machine: more than 10% of its CPU time went
    to other processes while the benchmark ran (``others_cpu_share``).

    Measured here: with the 2 cores oversubscribed, PyTorch's 2-thread OpenMP runs of
    MiniLM went from 13 ms to 500 ms per sentence (1 thread stayed at 13 ms), so such
    runs say little about either system. The load average is no test: the benchmark's
    own 2 threads hold it near 2.
    """
    share = m.get("others_cpu_share")
    if share is None or share <= 0.1:
        return None
    return (
        f"**Warning:** other processes used {100 * share:.0f}% of the machine's CPU time "
        "while this ran; timings, PyTorch's multi-threaded ones above all, are unreliable. "
        "Rerun on an idle machine."
    )


def reuse_note(reused: list[str]) -> str | None:
    if not reused:
        return None
    return (
        f"Note: {len(reused)} artifact(s) (runs, bundles, adapters) were reused from an earlier "
        "run in the work folder, so their build time is not in the wall time (`--fresh` "
        "rebuilds everything)."
    )


def machine_line(m: dict) -> str:
    v = m["versions"]
    return (
        f"{m['cpu']}, {m['cores_usable'] or m['cores']} cores, {m['memory_gb']} GB; "
        f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, onnxruntime {v['onnxruntime']}, ptedge {v['ptedge']} "
        f"(git {m['git']['commit']}{'+dirty' if m['git']['dirty'] else ''}); {m['date']}"
    )


# -- artifacts built once and reused ------------------------------------------------------


class Cache:
    """Reuse run folders, bundles and adapters while the parameters that built them hold.

    ``work/artifacts.json`` maps each artifact folder to the parameters it was built with;
    a folder whose parameters differ, or whose marker file is missing, is rebuilt.
    """

    def __init__(self, work: Path, fresh: bool = False):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.index_path = self.work / "artifacts.json"
        self.index = {} if fresh or not self.index_path.is_file() else self._read()
        self.reused: list[str] = []  # artifacts taken from an earlier run (their time is not in)

    def _read(self) -> dict:
        try:
            return json.loads(self.index_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, path: Path, params: dict, build: Callable[[], object], marker: str) -> Path:
        key = str(Path(path).resolve())
        params = json.loads(json.dumps(params, default=str))
        if (Path(path) / marker).is_file() and self.index.get(key) == params:
            log(f"reusing {path}")
            self.reused.append(str(path))
            return Path(path)
        log(f"building {path}")
        self._write(key, None)
        build()
        self._write(key, params)
        return Path(path)

    def _write(self, key: str, params: dict | None) -> None:
        """Set (or, with None, drop) one entry, on top of the index as it is on disk now:
        benchmarks sharing a work folder keep each other's entries."""
        disk = self._read() if self.index_path.is_file() else {}
        for index in (self.index, disk):
            if params is None:
                index.pop(key, None)
            else:
                index[key] = params
        tmp = self.index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(disk, indent=1, sort_keys=True))
        tmp.replace(self.index_path)


def folder_bytes(path: Path, names: list[str] | None = None) -> int:
    """Bytes of the plain files in a folder (only ``names`` when given), not recursive."""
    path = Path(path)
    files = [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files if names is None or p.name in names)


BACKBONE_SHIPPED = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "generation_config.json",
)


def package_closure_bytes(roots: list[str]) -> dict:
    """Installed bytes of ``roots`` and their (non-extra) requirements, recursively."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: dict[str, int] = {}
    stack = list(roots)
    while stack:
        name = stack.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            try:
                size += (dist.locate_file(f)).stat().st_size
            except OSError:
                pass
        seen[name] = size
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            stack.append(r.name)
    return {"bytes": sum(seen.values()), "packages": sorted(seen)}


# -- data ----------------------------------------------------------------------------------


def need_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        sys.exit(f"benchmark data not found: {path} (the shared data folder beside the repo)")
    return path


def subsample(records, n: int | None, seed: int = 0):
    """A seeded sample of n records in file order, still a ``Records`` (keeps line numbers)."""
    from ptedge.data import Records

    if n is None or len(records) <= n:
        return records
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return Records(records.path, [records[i] for i in idx], [records.lines[i] for i in idx])


def write_records(path: Path, records, fields: list[str]) -> Path:
    """Write records as .jsonl, .csv or .tsv (by suffix), fields in order."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({f: r[f] for f in fields}) + "\n" for r in records))
    elif path.suffix == ".tsv":
        rows = ["\t".join(fields)] + ["\t".join(r[f] for f in fields) for r in records]
        path.write_text("\n".join(rows) + "\n")
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(fields)
            w.writerows([[r[k] for k in fields] for r in records])
    return path


def banking77_splits(work: Path) -> tuple[Path, Path, Path]:
    """(train, dev, test) CSVs: dev = the train records whose sha1(text) % 10 == 0.

    The carve is fixed by the text alone, so every run and machine gets the same split;
    BANKING77's test set is never used for choices.
    """
    from ptedge.data import read_records

    src = need_data("banking77")
    out = Path(work) / "banking77"
    train, dev = out / "train.csv", out / "dev.csv"
    if not (train.is_file() and dev.is_file()):
        recs = read_records(src / "train.csv")
        is_dev = [int(hashlib.sha1(r["text"].encode()).hexdigest(), 16) % 10 == 0 for r in recs]
        cols = ["text", "category"]
        write_records(train, [r for r, d in zip(recs, is_dev, strict=True) if not d], cols)
        write_records(dev, [r for r, d in zip(recs, is_dev, strict=True) if d], cols)
    return train, dev, src / "test.csv"


# -- PEFT ----------------------------------------------------------------------------------


def peft_config(task_type: str, n_virtual: int, hidden: int, inference: bool = False):
    """P-tuning as in the paper and as ptedge does it: LSTM reparameterisation with H/2 per
    direction and Linear(H,H)-ReLU-Linear(H,H), so both train the same encoder."""
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(
        task_type=getattr(TaskType, task_type),
        num_virtual_tokens=n_virtual,
        encoder_hidden_size=hidden // 2,
        encoder_reparameterization_type="LSTM",
        encoder_num_layers=2,
        encoder_dropout=0.0,
        inference_mode=inference,
    )


def hf_tokenizer(model_dir: Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = padding_side
    return tok


def hf_base(kind: str, model_dir: Path, n_labels: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "seq_cls":
        return AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=n_labels, dtype=torch.float32
        )
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def peft_new(kind: str, model_dir: Path, n_virtual: int, n_labels: int | None = None, seed=0):
    """A fresh PEFT P-tuning model to train: SEQ_CLS (classifier trained too) or CAUSAL_LM."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = hf_base(kind, model_dir, n_labels)
    task = "SEQ_CLS" if kind == "seq_cls" else "CAUSAL_LM"
    return get_peft_model(base, peft_config(task, n_virtual, base.config.hidden_size))


def peft_load(kind: str, model_dir: Path, adapter: Path, n_labels: int | None = None):
    """PEFT as users deploy it: the base model plus ``PeftModel.from_pretrained`` (which
    sets ``inference_mode=True``: the saved adapter holds the prompt encoder's *output*, so
    the prompt table is precomputed and no LSTM runs at inference)."""
    from peft import PeftModel

    base = hf_base(kind, model_dir, n_labels)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert model.active_peft_config.inference_mode
    return model.eval()


def causal_batch(tok, texts: list[str], answers: list[int] | None = None, max_len: int = 120):
    """Right-padded ids of ``texts`` (no special tokens: SmolLM2's tokenizer adds none),
    with the answer token appended and the loss on it alone when ``answers`` is given.
    Returns (input_ids, attention_mask, labels or None, last) where ``last[b]`` is the
    position (in the text, before PEFT's virtual tokens) whose logits predict the answer."""
    import torch

    rows = [e[:max_len] for e in tok(texts, add_special_tokens=False)["input_ids"]]
    last = [len(r) - 1 for r in rows]
    if answers is not None:
        rows = [r + [a] for r, a in zip(rows, answers, strict=True)]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = None
    if answers is not None:
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        if labels is not None:
            labels[b, len(r) - 1] = r[-1]
    return ids, mask, labels, torch.tensor(last)


def single_token_ids(tok, words: list[str], prefix: str = " ") -> list[int | None]:
    """Token id of ``prefix + word`` when it is one token (LAMA's protocol), else None."""
    encs = tok([prefix + w for w in words], add_special_tokens=False)["input_ids"]
    return [e[0] if len(e) == 1 else None for e in encs]


class PeftTask:
    """One PEFT P-tuning job: how to build a batch's loss and how to score records.

    ``kind``: "seq_cls" (label index targets) or "causal" (a next-token id target, scored
    over the vocabulary or over ``label_ids`` when given). ``text`` maps a record to the
    model's input text.
    """

    def __init__(self, kind, tok, text: Callable[[dict], str], label_ids=None, n_virtual=0):
        self.kind, self.tok, self.text = kind, tok, text
        self.label_ids = label_ids
        self.n_virtual = n_virtual

    def loss(self, model, records: list[dict], targets: list[int]):
        import torch

        texts = [self.text(r) for r in records]
        if self.kind == "seq_cls":
            enc = self.tok(
                texts,
                padding=True,
                truncation=True,
                max_length=BASELINE_TOKENS,
                return_tensors="pt",
            )
            return model(**enc, labels=torch.tensor(targets)).loss
        answers = [self.label_ids[t] for t in targets] if self.label_ids else targets
        ids, mask, labels, _ = causal_batch(self.tok, texts, answers)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def predict(self, model, records: list[dict], batch_size: int = 32) -> list[int]:
        """Top-1 index per record (label index, or vocabulary id for open vocabulary)."""
        import torch

        out: list[int] = []
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(records), batch_size):
                texts = [self.text(r) for r in records[i : i + batch_size]]
                if self.kind == "seq_cls":
                    enc = self.tok(
                        texts,
                        padding=True,
                        truncation=True,
                        max_length=BASELINE_TOKENS,
                        return_tensors="pt",
                    )
                    out += model(**enc).logits.argmax(-1).tolist()
                    continue
                ids, mask, _, last = causal_batch(self.tok, texts)
                pos = last + self.n_virtual  # PEFT's logits include the virtual positions
                keep = torch.unique(pos)  # only the answer positions go through the LM head
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                at = logits[torch.arange(len(texts)), torch.searchsorted(keep, pos)]  # (B, V)
                if self.label_ids:
                    at = at[:, self.label_ids]
                out += at.argmax(-1).tolist()
        return out


def peft_train(
    model,
    task: PeftTask,
    examples: list[tuple[dict, int]],
    *,
    steps: int,
    batch_size: int,
    lr: float = 3e-3,
    seed: int = 0,
    warmup: float = 0.06,
    dev: list[tuple[dict, int]] | None = None,
    eval_every: int | None = None,
) -> dict:
    """PEFT's P-tuning trained the way ptedge trains (AdamW, weight decay 0, linear warm-up
    then decay, gradient clipping 1.0, the same seeded batch order, the best dev state kept
    when ``dev`` is given). Returns per-step seconds and the dev history."""
    import torch

    from ptedge.head_fit import schedule

    params = [p for p in model.parameters() if p.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = schedule(opt, steps, warmup)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    eval_every = eval_every or max(steps // 5, 1)
    times, history, best = [], [], None
    model.train()  # as PEFT users train (the backbone's dropout, if any, is on)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        idx = []
        while len(idx) < batch_size:
            if not order:
                order = torch.randperm(len(examples), generator=gen).tolist()
            idx.append(order.pop())
        loss = task.loss(model, [examples[i][0] for i in idx], [examples[i][1] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        times.append(time.perf_counter() - t0)
        if dev and (step % eval_every == 0 or step == steps):
            acc = accuracy_of(task.predict(model, [r for r, _ in dev]), [t for _, t in dev])
            history.append({"step": step, "loss": loss_value, "dev_accuracy": acc})
            if best is None or acc > best["dev_accuracy"]:
                state = {n: p.detach().clone() for n, p in named}
                best = {"step": step, "dev_accuracy": acc, "state": state}
            model.train()
    if best is not None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(best["state"][n])
    model.eval()
    return {
        "step_s": times,
        "dev_history": history,
        "best": None if best is None else {k: best[k] for k in ("step", "dev_accuracy")},
    }


def accuracy_of(pred: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / max(1, len(gold))


def samples_per_s(step_s: list[float], batch_size: int, skip: int) -> float | None:
    """Throughput over the steps after the first ``skip`` (warm-up)."""
    kept = step_s[skip:]
    return batch_size * len(kept) / sum(kept) if kept and sum(kept) > 0 else None


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_report(out: Path, stem: str, result: dict, markdown: str) -> None:
    """A benchmark's OUT/STEM.json (the result) and OUT/STEM.md (its report)."""
    write_json(Path(out) / f"{stem}.json", result)
    (Path(out) / f"{stem}.md").write_text(markdown)


def leave_one_out(score: dict[tuple[str, str], float], candidates: list[str]) -> dict:
    """Per held-out task: the candidate with the best mean ``score[task, candidate]`` over
    the other tasks (the first of equals), its score on the held-out task, and the best
    candidate there in hindsight. Candidates not scored on every task are left out."""
    tasks = sorted({t for t, _ in score})
    cands = [c for c in candidates if all((t, c) in score for t in tasks)]
    table = {}
    for held in tasks:
        others = [t for t in tasks if t != held]
        chosen = max(cands, key=lambda c: sum(score[t, c] for t in others) / len(others))
        best = max(cands, key=lambda c: score[held, c])
        table[held] = {
            "chosen_by_others": chosen,
            "accuracy": score[held, chosen],
            "best_in_hindsight": best,
            "best_accuracy": score[held, best],
        }
    return table


def fmt(x, digits: int = 3, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"
