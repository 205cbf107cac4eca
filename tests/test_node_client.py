"""The Node.js client (examples/node) against the Python runtime: same labels, same scores.

examples/node/predict.mjs is written only from docs/bundle-format.md, so agreement here
checks the document as much as the client. Both tokenizer families are covered on tiny
backbones (BERT WordPiece, GPT-2 byte-level BPE); the slow test uses real MiniLM and
BANKING77. Needs `node` and `npm`; installs examples/node/node_modules with `npm ci` once
per session when it is missing (onnxruntime-node's CUDA download is skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import ROOT, shared_data, splitting_rule, write_jsonl  # noqa: E402

from ptedge import calibration  # noqa: E402
from ptedge.data import read_records  # noqa: E402
from ptedge.export import ExportArgs, export  # noqa: E402
from ptedge.runtime import Predictor  # noqa: E402
from ptedge.train import TrainArgs, train  # noqa: E402

NODE_DIR = ROOT / "examples" / "node"
PACKAGES = ("onnxruntime-node", "@huggingface/tokenizers")
INSTALL_TIMEOUT = 600  # s, npm ci (about 300 MB, mostly onnxruntime binaries)
RUN_TIMEOUT = 300  # s, one predict.mjs run
SCORE_ATOL = 1e-4
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET")

if shutil.which("node") is None or shutil.which("npm") is None:
    pytest.skip("node and npm are needed for the Node.js client test", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _installed() -> bool:
    return all((NODE_DIR / "node_modules" / p / "package.json").is_file() for p in PACKAGES)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """examples/node/predict.mjs with its dependencies installed (npm ci, once)."""
    if not _installed():
        lock = (NODE_DIR / "package-lock.json").is_file()
        cmd = ["npm", "ci" if lock else "install", "--no-audit", "--no-fund"]
        env = os.environ | {"ONNXRUNTIME_NODE_INSTALL": "skip"}
        try:
            proc = subprocess.run(
                cmd,
                cwd=NODE_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` in {NODE_DIR} took over {INSTALL_TIMEOUT} s")
        tail = (proc.stdout + proc.stderr)[-2000:]
        if proc.returncode != 0:
            if any(code in tail for code in NETWORK_ERRORS):
                pytest.skip(f"npm registry unreachable, cannot install {NODE_DIR}: {tail}")
            pytest.fail(f"`{' '.join(cmd)}` in {NODE_DIR} failed ({proc.returncode}):\n{tail}")
        if not _installed():
            pytest.fail(f"`{' '.join(cmd)}` succeeded but {PACKAGES} are not in node_modules")
    return NODE_DIR / "predict.mjs"


def run_node(
    script: Path, bundle: Path, records: list[dict], *, task=None, batch_size=32
) -> list[dict]:
    cmd = ["node", str(script), str(bundle), "--batch-size", str(batch_size)]
    if task is not None:
        cmd += ["--task", task]
    stdin = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} took over {RUN_TIMEOUT} s")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def assert_same(node: list[dict], python: list[dict], records: list[dict]) -> None:
    """Labels equal, every reported probability within SCORE_ATOL."""
    assert len(node) == len(python) == len(records)
    for i, (n, p) in enumerate(zip(node, python, strict=True)):
        where = f"record {i} {records[i]}"
        assert n["label"] == p["label"], where
        assert n["score"] == pytest.approx(p["score"], abs=SCORE_ATOL), where
        assert n.get("truncated", 0) == p.get("truncated", 0), where
        if "scores" in p:
            assert n["scores"].keys() == p["scores"].keys(), where
            for lab, v in p["scores"].items():
                assert n["scores"][lab] == pytest.approx(v, abs=SCORE_ATOL), (where, lab)
        if "top_k" in p:
            assert n["token_id"] == p["token_id"], where
            assert [t["token_id"] for t in n["top_k"]] == [t["token_id"] for t in p["top_k"]]
            assert [t["label"] for t in n["top_k"]] == [t["label"] for t in p["top_k"]]


# -- tiny backbones (fast): both tokenizer families, truncation, multi-task, vocab --------

SENTENCES = [
    "good fun for the whole family",
    "the movie was great",
    "wonderful actors",
    "a terrible boring film",
    "bad plot",
    "the film was terrible",
    "my card has not arrived yet",
    "Café naïve — 北京, émojis 😀 and UPPER case!",
    "  leading and trailing spaces  ",
    "the official language of france is french " * 6,  # truncated
    "",
]


def _records(n_fields: int = 1) -> list[dict]:
    recs = []
    for i, s in enumerate(SENTENCES):
        r = {"sentence": s, "label": str(i % 2)}
        if n_fields == 2:
            r["other"] = SENTENCES[(i * 3 + 1) % len(SENTENCES)]
        recs.append(r)
    if n_fields == 2:  # both fields cut, the odd spare token goes to the first
        recs.append({"sentence": SENTENCES[9], "other": (SENTENCES[3] + " ") * 5, "label": "1"})
    return recs


def _train(tiny, kind, train_file: Path, out: Path, template: str, **kw) -> Path:
    args = TrainArgs(
        model=str(tiny(kind)),
        train=str(train_file),
        template=template,
        out=str(out),
        steps=kw.pop("steps", 3),
        batch_size=4,
        **kw,
    )
    train(args, progress=False)
    return out


CASES = {
    # name: (backbone, template, train kwargs, fields)
    "bert-linear": (
        "bert",
        "[P:2] {sentence} [P:2] it was [MASK] .",
        {"head": "linear", "max_length": 32},
        1,
    ),
    "bert-two-fields": (
        "bert",
        "[P] {sentence} ? [MASK] , {other} [P:2]",
        {"head": "linear", "max_length": 21},
        2,
    ),
    "bert-mlm-verbalizer": (
        "bert-mlm",
        "[P:2] {sentence} [P:2] it was [MASK] .",
        {"verbalizer": {"0": "bad", "1": "great"}, "max_length": 24},
        1,
    ),
    "gpt2-verbalizer": (
        "gpt2",
        "[P:2] {sentence} [P:2] It was [MASK]",
        {"verbalizer": {"0": "terrible", "1": "great"}, "max_length": 24},
        1,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_node_matches_python_on_tiny_backbones(tiny, node_client, tmp_path, case):
    kind, template, kw, n_fields = CASES[case]
    records = _records(n_fields)
    data = write_jsonl(tmp_path / "train.jsonl", records * 2)
    run = _train(tiny, kind, data, tmp_path / case, template, **kw)
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle)))
    python = Predictor(bundle).predict(records)
    assert any(p.get("truncated") for p in python), "the data should exercise truncation"
    for batch_size in (1, 4):
        assert_same(run_node(node_client, bundle, records, batch_size=batch_size), python, records)


def test_node_applies_calibration_and_rejection_like_python(tiny, node_client, tmp_path):
    """The manifest's temperatures and threshold (docs/bundle-format.md §7): the same
    probabilities and the same null labels in Node as in Python."""
    records = _records()
    data = write_jsonl(tmp_path / "train.jsonl", records * 2)
    run = _train(tiny, "bert", data, tmp_path / "calib", "[P:2] {sentence} [MASK]", head="linear")
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle), eval_file=str(data)))
    manifest = json.loads((bundle / "ptedge.json").read_text())
    task = manifest["tasks"]["calib"]
    assert task["calibration"]["temperature"] > 0
    task["calibration"]["temperature"] = 3.7  # far from 1, so a client that ignores it fails
    (bundle / "ptedge.json").write_text(json.dumps(manifest))
    raw, _ = Predictor(bundle).scores(records)
    top = sorted(calibration.probabilities(raw, 9.0).max(-1))  # the rejection temperature
    task["reject"] = {"threshold": top[len(top) // 2], "temperature": 9.0}  # half rejected
    (bundle / "ptedge.json").write_text(json.dumps(manifest))
    python = Predictor(bundle).predict(records)
    assert 0 < sum(r["label"] is None for r in python) < len(records)
    assert_same(run_node(node_client, bundle, records), python, records)


@pytest.mark.parametrize("kind", ["distance", "combined"])
def test_node_applies_a_distance_rejection_like_python(tiny, node_client, tmp_path, kind):
    """reject.score "distance" and "combined" (docs/bundle-format.md §7): the same null
    labels in Node as in Python, with the threshold splitting the records."""
    records = _records()
    data = write_jsonl(tmp_path / "train.jsonl", records * 2)
    run = _train(tiny, "bert", data, tmp_path / "dist", "[P:2] {sentence} [MASK]", head="linear")
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle)))
    manifest = json.loads((bundle / "ptedge.json").read_text())
    raw, _ = Predictor(bundle).scores(records)
    manifest["tasks"]["dist"]["reject"] = splitting_rule(raw, kind)
    (bundle / "ptedge.json").write_text(json.dumps(manifest))
    python = Predictor(bundle).predict(records)
    assert 0 < sum(r["label"] is None for r in python) < len(records)
    assert_same(run_node(node_client, bundle, records), python, records)


def test_node_open_vocabulary_gpt2(tiny, node_client, tmp_path):
    """An lm head without verbalizer: scores over the vocabulary, ids decoded to words."""
    facts = [
        {"subject": s, "label": o}
        for s, o in [("france", "paris"), ("italy", "rome"), ("germany", "berlin")]
    ]
    data = write_jsonl(tmp_path / "facts.jsonl", facts * 3)
    run = _train(tiny, "gpt2", data, tmp_path / "lama", "[P:2] {subject} [P] capital [MASK]")
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle)))
    records = [{"subject": s} for s in ("france", "spain", "the whole family", "")]
    python = Predictor(bundle).predict(records)
    assert "top_k" in python[0]
    assert_same(run_node(node_client, bundle, records), python, records)


def test_node_multi_task_bundle(tiny, node_client, tmp_path):
    """--task picks an output; the second task's prompt ids start after the first's."""
    data = write_jsonl(tmp_path / "train.jsonl", _records() * 2)
    first = _train(tiny, "bert", data, tmp_path / "first", "[P:2] {sentence} [MASK]")
    second = _train(tiny, "bert", data, tmp_path / "second", "{sentence} [P:3] it was [MASK]")
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(first), str(second)], out=str(bundle)))
    records = _records()
    p = Predictor(bundle)
    for task in ("first", "second"):
        assert_same(
            run_node(node_client, bundle, records, task=task), p.predict(records, task), records
        )
    proc = subprocess.run(
        ["node", str(node_client), str(bundle)],
        input="{}\n",
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 1 and "--task" in proc.stderr


def test_node_refuses_corrupt_bundle_and_missing_field(tiny, node_client, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _records() * 2)
    run = _train(tiny, "bert", data, tmp_path / "run", "[P] {sentence} [MASK]", steps=1)
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle)))

    def node(stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["node", str(node_client), str(bundle)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )

    bad = node('{"text": "no sentence here"}\n')
    assert bad.returncode == 1 and "sentence" in bad.stderr
    tok = bundle / "tokenizer.json"
    tok.write_text(tok.read_text().replace("[UNK]", "[UNK] "))
    corrupt = node('{"sentence": "bad plot"}\n')
    assert corrupt.returncode == 1 and "sha256" in corrupt.stderr


# -- real backbone (slow): MiniLM, BANKING77 ---------------------------------------------


@pytest.mark.slow
def test_node_matches_python_minilm_banking77(node_client, tmp_path):
    from ptedge.backbones import fetch

    train_csv = shared_data("banking77", "train.csv")
    test_csv = shared_data("banking77", "test.csv")
    try:
        model = fetch("minilm-l6", quiet=True)
    except RuntimeError as e:
        pytest.skip(f"minilm-l6 backbone unavailable: {e}")
    run = tmp_path / "b77"
    args = TrainArgs(
        model=str(model),
        train=str(train_csv),
        template="[P:3] {text} [P:3] [MASK]",
        label_field="category",
        head="linear",
        steps=5,
        batch_size=8,
        out=str(run),
    )
    train(args, progress=False)
    bundle = tmp_path / "bundle"
    export(ExportArgs(runs=[str(run)], out=str(bundle)))
    records = [{"text": r["text"]} for r in read_records(str(test_csv))[:100]]
    python = Predictor(bundle).predict(records)
    assert_same(run_node(node_client, bundle, records), python, records)
