"""Hardening tests for bundles and the torch-free runtime.

Broken or hostile bundles (truncated model, unknown format version, file names outside
the bundle), export's atomicity (non-empty output, interruption), the runtime API's
edges (missing field, empty input, over-long text), one Predictor shared by threads,
memory over thousands of predictions, multi-task bundles against single-task ones, and
``import ptedge.runtime`` in a fresh interpreter without torch.

One tiny GPT-2 bundle is trained and exported once per module; tests copy it before
damaging it.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from conftest import ROOT, write_jsonl  # noqa: E402

from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.runtime import BundleError, Predictor, load_manifest  # noqa: E402
from ptedge.template import encode  # noqa: E402
from ptedge.train import TrainArgs, train  # noqa: E402

SST_TEMPLATE = "[P:2] {sentence} [P:2] It was [MASK]"
TOPIC_TEMPLATE = "[P:3] {sentence} . All in all [MASK]"
GOOD = ["good fun for the whole family", "the movie was great", "wonderful actors", "great"]
BAD = ["a terrible boring film", "bad plot", "the film was terrible", "boring"]
SENTENCES = (
    GOOD
    + BAD
    + [
        "my card has not arrived yet",
        "the official language of france is french",
        "paris london rome berlin madrid",
        "a",
        "good good good good good good bad bad bad",
        "the actors were wonderful but the plot was bad",
    ]
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_run(model: Path, data: Path, out: Path, template: str, verbalizer: dict, seed=0):
    args = TrainArgs(
        model=str(model),
        train=str(data),
        template=template,
        verbalizer=verbalizer,
        out=str(out),
        steps=3,
        batch_size=4,
        seed=seed,
        max_length=32,
    )
    train(args, progress=False)
    return out


@pytest.fixture(scope="module")
def work(tiny, tmp_path_factory) -> dict:
    """A tiny GPT-2 run ``sst`` and its single-task bundle (fp32)."""
    root = tmp_path_factory.mktemp("hardening")
    recs = [{"sentence": s, "label": "1"} for s in GOOD] + [
        {"sentence": s, "label": "0"} for s in BAD
    ]
    data = write_jsonl(root / "sent.jsonl", recs * 2)
    model = tiny("gpt2")
    sst = _train_run(
        model, data, root / "runs" / "sst", SST_TEMPLATE, {"0": "terrible", "1": "great"}
    )
    bundle = root / "bundles" / "sst"
    export(ExportArgs(runs=[str(sst)], out=str(bundle)))
    return {"root": root, "data": data, "model": model, "sst": sst, "bundle": bundle}


@pytest.fixture
def bundle(work, tmp_path) -> Path:
    """A private copy of the module's bundle, free to damage."""
    return Path(shutil.copytree(work["bundle"], tmp_path / "bundle"))


def _records(n: int | None = None) -> list[dict]:
    recs = [{"sentence": s} for s in SENTENCES]
    return recs if n is None else [recs[i % len(recs)] for i in range(n)]


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "ptedge.json").read_text())


def _write_manifest(bundle: Path, m: dict) -> None:
    (bundle / "ptedge.json").write_text(json.dumps(m))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (files) and mtime: "exactly as it was"."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        snap[str(p.relative_to(folder))] = (
            p.read_bytes() if p.is_file() else None,
            st.st_mtime_ns,
        )
    return snap


# --- damaged and hostile bundles -----------------------------------------------------


def test_truncated_model_fails_the_sha256_check(bundle):
    model = bundle / _manifest(bundle)["model"]
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"model\.onnx.*sha256") as e:
        Predictor(bundle)
    assert isinstance(e.value, ValueError)


def test_truncated_model_without_verify_is_still_a_clear_error(bundle):
    model = bundle / _manifest(bundle)["model"]
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"model\.onnx.*onnxruntime cannot load it"):
        Predictor(bundle, verify=False)


def test_unknown_format_version_is_named(bundle):
    m = _manifest(bundle)
    m["format_version"] = 99
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match=r"format version 99"):
        Predictor(bundle)
    with pytest.raises(BundleError, match=r"format version 99"):
        load_manifest(bundle, verify=False)


@pytest.fixture
def spy_opens(monkeypatch):
    """Record every path the runtime opens, by Python, onnxruntime or tokenizers."""
    import onnxruntime

    import ptedge.runtime as rt

    opened: list[Path] = []

    def note(p):
        if isinstance(p, (str, os.PathLike)):
            opened.append(Path(os.fsdecode(p)).resolve())

    def wrap(fn, pos=0):
        def spy(*args, **kwargs):
            if len(args) > pos:
                note(args[pos])
            return fn(*args, **kwargs)

        return spy

    monkeypatch.setattr(builtins, "open", wrap(builtins.open))
    monkeypatch.setattr(io, "open", wrap(io.open))
    monkeypatch.setattr(os, "open", wrap(os.open))
    monkeypatch.setattr(pathlib.Path, "open", wrap(pathlib.Path.open))
    monkeypatch.setattr(rt, "load_tokenizer", wrap(rt.load_tokenizer))
    monkeypatch.setattr(onnxruntime, "InferenceSession", wrap(onnxruntime.InferenceSession))
    return opened


@pytest.mark.parametrize("key", ["model", "tokenizer"])
@pytest.mark.parametrize("form", ["parent", "absolute", "nested", "backslash"])
@pytest.mark.parametrize("verify", [True, False])
def test_file_names_outside_the_bundle_are_refused_unopened(
    bundle, tmp_path, spy_opens, key, form, verify
):
    m = _manifest(bundle)
    outside = tmp_path / "outside.bin"
    shutil.copy(bundle / m[key], outside)  # a valid file: only the refusal can stop it
    name = {
        "parent": "../outside.bin",
        "absolute": str(outside),
        "nested": "sub/../../outside.bin",
        "backslash": "..\\outside.bin",
    }[form]
    m[key] = name
    m["files"][name] = _sha(outside)
    _write_manifest(bundle, m)
    spy_opens.clear()  # only what the runtime opens from here on
    with pytest.raises(BundleError, match="outside the bundle"):
        Predictor(bundle, verify=verify)
    assert outside.resolve() not in spy_opens


def test_a_listed_file_outside_the_bundle_is_refused_even_if_unused(bundle, tmp_path, spy_opens):
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    m = _manifest(bundle)
    m["files"]["../secret.txt"] = _sha(outside)
    _write_manifest(bundle, m)
    spy_opens.clear()  # only what the runtime opens from here on
    with pytest.raises(BundleError, match="outside the bundle"):
        Predictor(bundle)
    assert outside.resolve() not in spy_opens


# --- export atomicity -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["files", "file"])
def test_export_into_a_non_empty_target_needs_force(work, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "files":
        (out / "sub").mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
        (out / "sub" / "more.bin").write_bytes(b"\0\1\2")
    else:
        out.write_text("a file, not a folder")
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        export(ExportArgs(runs=[str(work["sst"])], out=str(out)))
    assert _snapshot(tmp_path) == before


def _interrupt_export_onnx(graph, runs, sample, path):
    Path(path).write_bytes(b"half an onnx file")
    raise KeyboardInterrupt


def _interrupt_parity(session, runs, samples):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "step, stub",
    [("export_onnx", _interrupt_export_onnx), ("check_parity", _interrupt_parity)],
)
def test_interrupted_export_leaves_nothing_behind(work, tmp_path, monkeypatch, step, stub):
    import ptedge.export.pipeline as ex

    monkeypatch.setattr(ex, step, stub)
    parent = tmp_path / "bundles"
    parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        export(ExportArgs(runs=[str(work["sst"])], out=str(parent / "sst")))
    assert list(parent.iterdir()) == []  # neither the bundle nor a .sst.* temp folder


def test_interrupted_forced_export_keeps_the_old_bundle(work, bundle, monkeypatch):
    import ptedge.export.pipeline as ex

    monkeypatch.setattr(ex, "check_parity", _interrupt_parity)
    before = _snapshot(bundle)
    with pytest.raises(KeyboardInterrupt):
        export(ExportArgs(runs=[str(work["sst"])], out=str(bundle), force=True))
    assert _snapshot(bundle) == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]
    assert Predictor(bundle).predict(_records(2))


# --- runtime API edges ------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(work) -> Predictor:
    return Predictor(work["bundle"])


def test_missing_field_is_named(predictor):
    with pytest.raises(ValueError, match="'sentence'"):
        predictor.predict([{"sentence": "good"}, {"text": "no sentence here"}])
    with pytest.raises(ValueError, match="'sentence'"):
        predictor.predict([{"sentence": None}])


def test_empty_input_gives_an_empty_list(predictor):
    assert predictor.predict([]) == []
    assert predictor.predict([], batch_size=1) == []


def test_over_long_text_is_truncated_in_its_field_and_counted(predictor):
    name, spec = predictor.task(None)
    compiled = spec["template"]
    long_text = " ".join(["the movie was great and the actors were wonderful"] * 40)
    field_len = len(predictor.tokenizer.encode(" " + long_text, add_special_tokens=False).ids)
    enc = encode(compiled, predictor.tokenizer, [{"sentence": long_text}])
    ids = enc.input_ids[0].tolist()
    assert len(ids) == compiled["max_length"] == 32
    base = compiled["pseudo_base"]
    lead, tail = [base, base + 1], [base + 2, base + 3]
    literal = next(s["ids"] for s in compiled["segments"] if "ids" in s)  # " It was"
    assert ids[:2] == lead  # pseudo tokens kept, in place
    assert ids[-len(literal) - 2 :] == tail + literal  # and the literal text after them
    assert enc.slot[0] == len(ids) - 1  # causal: the answer follows the last token
    kept = len(ids) - 4 - len(literal)
    assert enc.truncated[0] == field_len - kept > 0

    out = predictor.predict([{"sentence": long_text}, {"sentence": "great"}])
    assert out[0]["truncated"] == field_len - kept
    assert "truncated" not in out[1]
    assert out[0]["label"] in spec["labels"]


# --- concurrency and memory -------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_shared_predictor_in_threads_matches_serial(predictor, batch_size):
    records = _records(40)
    serial = predictor.predict(records, batch_size=batch_size)
    start = threading.Barrier(8)

    def work(_):
        start.wait()
        return [predictor.predict(records, batch_size=batch_size) for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(work, range(8)) for r in rs]
    for got in results:
        assert [g["label"] for g in got] == [s["label"] for s in serial]
        for g, s in zip(got, serial, strict=True):
            assert g["scores"] == pytest.approx(s["scores"], abs=1e-6)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


def test_memory_does_not_grow_over_repeated_predictions(predictor):
    records = _records(50)
    for _ in range(10):  # warm-up: arenas, caches, lazily loaded kernels
        predictor.predict(records, batch_size=8)
    base = _rss_mb()
    for _ in range(100):  # 5,000 predictions
        predictor.predict(records, batch_size=8)
    grown = _rss_mb() - base
    assert grown < 30, f"RSS grew by {grown:.1f} MB over 5,000 predictions"


# --- multi-task bundles -----------------------------------------------------------------


@pytest.fixture(scope="module")
def multi(work) -> dict:
    root = work["root"]
    topic = _train_run(
        work["model"],
        work["data"],
        root / "runs" / "topic",
        TOPIC_TEMPLATE,
        {"0": "bad", "1": "good"},
        seed=1,
    )
    single = root / "bundles" / "topic"
    both = root / "bundles" / "both"
    export(ExportArgs(runs=[str(topic)], out=str(single)))
    export(ExportArgs(runs=[str(work["sst"]), str(topic)], out=str(both)))
    return {"sst": work["bundle"], "topic": single, "both": both}


@pytest.mark.parametrize("task", ["sst", "topic"])
def test_multi_task_bundle_matches_single_task_bundles(multi, task):
    records = _records()
    both = Predictor(multi["both"])
    assert sorted(both.tasks) == ["sst", "topic"]
    single = Predictor(multi[task]).predict(records)
    got = both.predict(records, task=task)
    assert [g["label"] for g in got] == [s["label"] for s in single]
    for g, s in zip(got, single, strict=True):
        assert g["score"] == pytest.approx(s["score"], abs=1e-5)
        assert g["scores"] == pytest.approx(s["scores"], abs=1e-5)


def test_multi_task_bundle_needs_a_task(multi):
    with pytest.raises(ValueError, match="choose one with task="):
        Predictor(multi["both"]).predict(_records(1))


# --- torch-free runtime -----------------------------------------------------------------


def test_runtime_in_a_fresh_interpreter_loads_no_torch(work, predictor):
    code = """
import json, sys
import ptedge.runtime
heavy = ("torch", "transformers", "optimum")
after_import = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
from ptedge.runtime import Predictor
p = Predictor(sys.argv[1])
labels = [r["label"] for r in p.predict(json.loads(sys.argv[2]))]
after_predict = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(json.dumps({"import": after_import, "predict": after_predict, "labels": labels}))
"""
    records = _records()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", code, str(work["bundle"]), json.dumps(records)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["import"] == [] and out["predict"] == []
    assert out["labels"] == [r["label"] for r in predictor.predict(records)]


# --- found while writing these tests ----------------------------------------------------


def test_export_of_a_run_whose_head_reads_no_slot(tiny, tmp_path):
    recs = [{"sentence": s, "label": "1"} for s in GOOD] + [
        {"sentence": s, "label": "0"} for s in BAD
    ]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    run = tmp_path / "mean"
    train(
        TrainArgs(
            model=str(tiny("bert")),
            train=str(data),
            template="[P:2] {sentence} [MASK]",
            pool="mean",
            out=str(run),
            steps=2,
            batch_size=4,
        ),
        progress=False,
    )
    export(ExportArgs(runs=[str(run)], out=str(tmp_path / "b")))
    assert len(Predictor(tmp_path / "b").predict(recs)) == len(recs)
