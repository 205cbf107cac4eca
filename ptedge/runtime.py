"""The runtime: run a ptedge bundle with onnxruntime, without PyTorch.

``Predictor(bundle_dir)`` checks the manifest (format version, file names, sha256),
opens one onnxruntime session and encodes records with the same template code that
training used (``ptedge.template``). Imports only numpy, onnxruntime, tokenizers and
the torch-free ptedge modules; a test proves no torch, transformers or optimum loads.

One Predictor may be shared by threads: onnxruntime sessions and tokenizers are
thread-safe and ``predict`` keeps no state between calls.

Not responsible for: training, export, reading data files (``ptedge.data``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

import numpy as np

from ptedge.calibration import can_reject, ece, in_scope, probabilities
from ptedge.config import BUNDLE_FORMAT_VERSION, BUNDLE_MANIFEST, read_json
from ptedge.template import encode, load_tokenizer, record_fields

TOP_K = 5  # alternatives listed for open-vocabulary tasks


class BundleError(ValueError):
    """A bundle folder that cannot be used; the message says which file and why."""


def _safe_name(bundle: Path, name: str) -> Path:
    """A file named by the manifest, refused if it points outside the bundle."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or len(p.parts) != 1:
        raise BundleError(
            f"{bundle / BUNDLE_MANIFEST}: refusing file name {name!r} outside the bundle"
        )
    return bundle / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """Read and check a bundle's manifest; ``verify`` also checks every file's sha256."""
    bundle = Path(bundle)
    path = bundle / BUNDLE_MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: not a bundle (no {BUNDLE_MANIFEST})")
    m = read_json(path)
    if m.get("format_version") != BUNDLE_FORMAT_VERSION or "tasks" not in m:
        raise BundleError(
            f"{path}: bundle format version {m.get('format_version')!r}, "
            f"this ptedge reads {BUNDLE_FORMAT_VERSION}"
        )
    files = m.get("files") or {}
    ort_file = (m.get("ort") or {}).get("file")
    for name in (m.get("model"), m.get("tokenizer"), *([ort_file] if ort_file else [])):
        if name not in files:
            raise BundleError(f"{path}: file {name!r} is not listed with a sha256")
    for name, digest in files.items():
        f = _safe_name(bundle, name)
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if verify and _sha256(f) != digest:
            raise BundleError(f"{f}: sha256 does not match the manifest (corrupt or truncated)")
    return m


def _temperature(spec: dict) -> float:
    """The task's calibration temperature (1 for bundles without one)."""
    return float((spec.get("calibration") or {}).get("temperature", 1.0))


def _rejected(scores: np.ndarray, spec: dict) -> np.ndarray:
    """(N,) bool: records that look less in scope than the rejection threshold, under the
    task's rule (docs/bundle-format.md §7; a rule without a temperature, from bundles
    older than the key, applies the calibration temperature)."""
    reject = spec.get("reject") or {}
    if not reject:
        return np.zeros(len(scores), dtype=bool)
    rule = {"temperature": _temperature(spec)} | reject
    return in_scope(scores, rule) < float(reject["threshold"])


class Predictor:
    """Predictions from a bundle. ``providers`` and ``threads`` go to onnxruntime."""

    def __init__(
        self,
        bundle: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        verify: bool = True,
        prefer_ort: bool = False,
    ):
        import onnxruntime as ort

        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle, verify=verify)
        self.tasks: dict[str, dict] = self.manifest["tasks"]
        self.tokenizer = load_tokenizer(_safe_name(self.bundle, self.manifest["tokenizer"]))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        name = self.manifest["model"]
        if prefer_ort:
            if not self.manifest.get("ort"):
                raise BundleError(f"{self.bundle}: no ORT-format model (export with --format ort)")
            name = self.manifest["ort"]["file"]
        model = _safe_name(self.bundle, name)
        providers = providers or ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels only when torch
            # loaded them first or when asked to; a torch-free client must ask.
            ort.preload_dlls()
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for broken files
            raise BundleError(f"{model}: onnxruntime cannot load it ({e})") from None
        self._inputs = {i.name for i in self.session.get_inputs()}  # a mean-pool head has no slot

    def task(self, task: str | None) -> tuple[str, dict]:
        """(name, manifest entry) of a task; the only one when ``task`` is None."""
        if task is None:
            if len(self.tasks) != 1:
                raise ValueError(f"bundle has tasks {sorted(self.tasks)}: choose one with task=")
            task = next(iter(self.tasks))
        if task not in self.tasks:
            raise ValueError(f"no task {task!r} in the bundle (tasks: {sorted(self.tasks)})")
        return task, self.tasks[task]

    def scores(self, records: list[dict], task: str | None = None, batch_size: int = 32):
        """Raw task scores, (N, L) or (N, V), in record order; also dropped-token counts."""
        name, spec = self.task(task)
        compiled = spec["template"]
        out: list[np.ndarray] = [None] * len(records)  # type: ignore[list-item]
        truncated = np.zeros(len(records), dtype=np.int64)
        # encode once, then batch records of similar length together (less padding)
        fields = record_fields(compiled)
        order = np.argsort(
            [sum(len(str(r.get(f, ""))) for f in fields) for r in records], kind="stable"
        )
        for i in range(0, len(records), batch_size):
            idx = order[i : i + batch_size]
            enc = encode(compiled, self.tokenizer, [records[j] for j in idx])
            feeds = {
                "input_ids": enc.input_ids,
                "attention_mask": enc.attention_mask,
                "slot": enc.slot,
            }
            feeds = {k: v for k, v in feeds.items() if k in self._inputs}
            res = self.session.run([spec["output"]], feeds)[0]  # (b, L|V)
            for k, j in enumerate(idx):
                out[j] = res[k]
            truncated[idx] = enc.truncated
        width = out[0].shape[-1] if records else 0
        return (np.stack(out) if records else np.zeros((0, width), np.float32)), truncated

    def generate(
        self,
        records: list[dict],
        task: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        batch_size: int = 32,
    ) -> list[dict]:
        """Continue each record's prompt: one dict with ``text`` and ``tokens`` per record.

        Greedy by default; ``temperature`` > 0 samples (with ``top_k``/``top_p``, ``seed``).
        Stops at end-of-sequence. Needs a generation bundle (``--head generate``).
        """
        from ptedge.decoding import decode

        name, spec = self.task(task)
        if spec["kind"] != "generate":
            raise ValueError(f"task {name!r} is a {spec['kind']} task; use predict()")
        compiled = spec["template"]
        results = []
        for i in range(0, len(records), batch_size):
            enc = encode(compiled, self.tokenizer, records[i : i + batch_size], padding_side="left")
            seqs = decode(
                self.session,
                enc.input_ids,
                enc.attention_mask,
                spec["eos_id"],
                compiled["pad_id"],
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                None if seed is None else seed + i,
            )
            results += [{"text": self.tokenizer.decode(t).strip(), "tokens": t} for t in seqs]
        return results

    def predict(self, records: list[dict], task: str | None = None, batch_size: int = 32):
        """One dict per record: ``label``, ``score`` and ``scores`` (or ``top_k``); for a
        generation task, ``text`` (greedy, see ``generate``)."""
        name, spec = self.task(task)
        if not records:
            return []
        if spec["kind"] == "generate":
            return self.generate(records, name, batch_size=batch_size)
        scores, truncated = self.scores(records, name, batch_size)
        probs = probabilities(scores, _temperature(spec))
        rejected = _rejected(scores, spec).tolist()
        results = []
        if spec["kind"] == "classify":
            labels = spec["labels"]
            for row, best, no, t in zip(
                probs.tolist(), probs.argmax(-1).tolist(), rejected, truncated, strict=True
            ):
                r = {
                    "label": None if no else labels[best],
                    "score": row[best],
                    "scores": dict(zip(labels, row, strict=True)),
                }
                results.append(r | ({"truncated": int(t)} if t else {}))
        else:
            for p, no, t in zip(probs, rejected, truncated, strict=True):
                top = np.argsort(-p)[:TOP_K]
                words = [self.tokenizer.decode([int(i)]).strip() for i in top]
                r = {
                    "label": None if no else words[0],
                    "score": float(p[top[0]]),
                    "token_id": int(top[0]),
                    "top_k": [
                        {"label": w, "score": float(p[i]), "token_id": int(i)}
                        for w, i in zip(words, top, strict=True)
                    ],
                }
                results.append(r | ({"truncated": int(t)} if t else {}))
        return results

    def evaluate(self, records, task: str | None = None, batch_size: int = 32) -> dict:
        """{"accuracy", "n", "skipped", "ece"} on labelled records (same counting as
        training; ``ece`` of the calibrated top-label confidences).

        With a rejection threshold, a record whose label is none of the task's is out of
        scope: it counts as right when rejected, and the result adds ``in_scope_accuracy``
        (rejected in-scope records count as wrong), ``oos_recall`` (the share of
        out-of-scope records rejected), ``n_in_scope``, ``n_oos`` and ``rejected``.
        """
        from ptedge.targets import accuracy, class_targets, vocab_targets

        name, spec = self.task(task)
        if spec["kind"] == "generate":
            from ptedge.data import labels_of
            from ptedge.targets import exact_match

            texts = [r["text"] for r in self.generate(records, name, batch_size=batch_size)]
            return exact_match(texts, labels_of(records, spec["label_field"]))
        rejects = can_reject(spec)
        if spec["kind"] == "classify":
            targets = class_targets(
                records, spec["label_field"], spec["labels"], unknown_ok=rejects
            )
        else:
            targets = vocab_targets(records, spec["label_field"], spec["template"], self.tokenizer)
        keep = [i for i, t in enumerate(targets) if t is not None]
        scores, _ = self.scores([records[i] for i in keep], name, batch_size)
        probs = probabilities(scores, _temperature(spec))
        gold = np.array([targets[i] for i in keep], dtype=np.int64)  # -1: out of scope
        pred = probs.argmax(-1) if keep else np.zeros(0, np.int64)
        top = probs.max(-1) if keep else np.zeros(0)
        skipped = len(targets) - len(keep)
        inside = gold >= 0
        result = {"ece": ece(top[inside], pred[inside] == gold[inside])}
        if not rejects:
            return accuracy(pred.tolist(), gold.tolist()) | {"skipped": skipped} | result
        rejected = _rejected(scores, spec) if keep else np.zeros(0, dtype=bool)
        right = np.where(inside, (pred == gold) & ~rejected, rejected)
        n_in, n_oos = int(inside.sum()), int((~inside).sum())
        return {
            "accuracy": float(right.mean()) if len(right) else 0.0,
            "n": len(right),
            "skipped": skipped,
            "in_scope_accuracy": float(right[inside].mean()) if n_in else None,
            "n_in_scope": n_in,
            "oos_recall": float(rejected[~inside].mean()) if n_oos else None,
            "n_oos": n_oos,
            "rejected": float(rejected.mean()) if len(right) else 0.0,
        } | result
