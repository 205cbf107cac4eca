"""Batch scoring with Ray Data (ptedge.integrations.ray, `ptedge predict --engine ray`).

One local Ray instance per test session (``ray.init(num_cpus=2)``, like a 2-CPU node);
its workers import ptedge as the tests do. Results are checked against a serial
``Predictor`` run, by an id column (Ray does not keep row order). The full 10,000-record
throughput measurement is tools/bench_ray.py; here the record counts are small.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_data, write_jsonl

from ptedge.integrations.ray import BundleScorer, input_files

SENTENCES = [
    "good fun for the whole family",
    "a terrible boring film",
    "my card has not arrived yet",
    "the movie was great",
    "bad plot",
    "the official language of france is french " * 6,  # truncated
]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs for the whole session."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed (pip install -e '.[ray]'; tools/setup.sh does)")
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_bundle(tiny, tmp_path_factory):
    pytest.importorskip("torch")
    from ptedge.export import ExportArgs, export
    from ptedge.train import TrainArgs, train

    root = tmp_path_factory.mktemp("ray-tiny")
    records = [{"sentence": s, "label": str(i % 2)} for i, s in enumerate(SENTENCES)]
    data = write_jsonl(root / "train.jsonl", records * 2)
    args = TrainArgs(
        model=str(tiny("bert")),
        train=str(data),
        template="[P:2] {sentence} [P] it was [MASK] .",
        head="linear",
        max_length=16,
        steps=3,
        batch_size=4,
        out=str(root / "run"),
    )
    train(args, progress=False)
    export(ExportArgs(runs=[str(root / "run")], out=str(root / "bundle")))
    return root / "bundle"


def _records(n: int) -> list[dict]:
    return [{"id": i, "sentence": SENTENCES[i % len(SENTENCES)] + f" {i}"} for i in range(n)]


# -- without Ray: the actor class and the input listing ------------------------------------


def test_integration_imports_neither_torch_nor_ray():
    code = (
        "import sys, ptedge.integrations.ray\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bundle_scorer_adds_prediction_columns(tiny_bundle):
    from ptedge.runtime import Predictor

    records = _records(8)
    batch = {
        "id": np.arange(8),
        "sentence": np.array([r["sentence"] for r in records], dtype=object),
    }
    out = BundleScorer(str(tiny_bundle), threads=1)(batch)
    python = Predictor(tiny_bundle).predict(records)
    assert out["id"].tolist() == list(range(8))
    assert out["pred_label"].tolist() == [p["label"] for p in python]
    np.testing.assert_allclose(out["pred_score"], [p["score"] for p in python], atol=1e-6)
    assert out["pred_truncated"].tolist() == [p.get("truncated", 0) for p in python]
    assert out["pred_truncated"].max() > 0


def test_bundle_scorer_refuses_missing_and_output_columns(tiny_bundle):
    scorer = BundleScorer(str(tiny_bundle), threads=1)
    with pytest.raises(ValueError, match="no column 'sentence'"):
        scorer({"text": np.array(["x"], dtype=object)})
    with pytest.raises(ValueError, match="'pred_label'"):
        scorer({"sentence": np.array(["x"], dtype=object), "pred_label": np.array(["y"])})


def test_input_files_folder_glob_and_errors(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    files, fmt = input_files(str(tmp_path))
    assert fmt == "jsonl" and [os.path.basename(f) for f in files] == ["a.jsonl", "b.jsonl"]
    assert input_files(str(tmp_path / "a*.jsonl"))[0] == [str(tmp_path / "a.jsonl")]
    (tmp_path / "c.csv").write_text("sentence\nx\n")
    with pytest.raises(ValueError, match="several formats"):
        input_files(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported file type"):
        input_files(str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match="no such file"):
        input_files(str(tmp_path / "missing.jsonl"))


# -- with a local Ray --------------------------------------------------------------------


def _predict(*args: str):
    from ptedge.cli import main

    return CliRunner().invoke(main, ["predict", *args])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_cli_engine_ray_matches_serial_predictor(ray_local, tiny_bundle, tmp_path, fmt):
    import pandas as pd

    from ptedge.runtime import Predictor

    records = _records(60)
    src = tmp_path / "in"
    src.mkdir()
    for part in range(2):  # two input files, one output folder
        df = pd.DataFrame(records[part * 30 : (part + 1) * 30])
        path = src / f"part{part}.{fmt}"
        if fmt == "jsonl":
            df.to_json(path, orient="records", lines=True)
        elif fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path)
    out = tmp_path / "out"
    r = _predict(str(tiny_bundle), "--engine", "ray", "--input", str(src), "--output", str(out))
    assert r.exit_code == 0, r.output
    read = {"jsonl": lambda p: pd.read_json(p, lines=True), "csv": pd.read_csv}
    got = pd.concat([read.get(fmt, pd.read_parquet)(p) for p in sorted(out.iterdir())])
    assert sorted(got["id"]) == list(range(60))
    got = got.set_index("id").sort_index()
    python = Predictor(tiny_bundle).predict(records)
    assert got["pred_label"].astype(str).tolist() == [p["label"] for p in python]
    np.testing.assert_allclose(got["pred_score"], [p["score"] for p in python], atol=1e-6)
    assert got["sentence"].tolist() == [r["sentence"] for r in records]


def test_cli_engine_ray_user_errors(ray_local, tiny_bundle, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "ok"}, {"sentence": None}])
    out = tmp_path / "out"
    r = _predict(str(tiny_bundle), "--engine", "ray", "--input", str(bad), "--output", str(out))
    assert r.exit_code == 1
    assert f"error: {bad}: record 2 has no value for field 'sentence'" in r.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]
    r = _predict(str(tiny_bundle), "--engine", "ray", "--input", str(bad))
    assert r.exit_code == 1 and "--output" in r.output
    out.mkdir()
    (out / "old.json").write_text("{}")
    good = write_jsonl(tmp_path / "good.jsonl", [{"sentence": "ok"}])
    r = _predict(str(tiny_bundle), "--engine", "ray", "--input", str(good), "--output", str(out))
    assert r.exit_code == 1 and "not an empty folder" in r.output


def _banking77_records(n: int) -> list[dict]:
    from ptedge.data import read_records

    rows = read_records(shared_data("banking77", "test.csv"))
    return [{"id": i, "text": rows[i % len(rows)]["text"]} for i in range(n)]


def _score(ray, bundle, records, **kw) -> dict[int, dict]:
    from ptedge.integrations.ray import score_dataset

    ds = score_dataset(ray.data.from_items(records), bundle, concurrency=2, threads=1, **kw)
    return {row["id"]: row for row in ds.take_all()}


@pytest.mark.slow
def test_ray_banking77_labels_identical_to_serial(ray_local, banking77_fp32_bundle):
    """fp32 answers do not depend on the batch: any batching gives the serial labels."""
    from ptedge.runtime import Predictor

    records = _banking77_records(1000)
    serial = Predictor(banking77_fp32_bundle, threads=1).predict(records)
    got = _score(ray_local, banking77_fp32_bundle, records, batch_size=100)
    assert sorted(got) == list(range(len(records)))
    assert [got[i]["pred_label"] for i in range(len(records))] == [s["label"] for s in serial]
    np.testing.assert_allclose(
        [got[i]["pred_score"] for i in range(len(records))],
        [s["score"] for s in serial],
        atol=1e-5,
    )


@pytest.mark.slow
def test_ray_banking77_int8_at_batch_1_identical_to_serial(ray_local, banking77_int8_bundle):
    """int8 bundles quantize activations per run: one record per run on both sides."""
    from ptedge.runtime import Predictor

    records = _banking77_records(300)
    serial = Predictor(banking77_int8_bundle, threads=1).predict(records, batch_size=1)
    got = _score(ray_local, banking77_int8_bundle, records, model_batch_size=1)
    assert [got[i]["pred_label"] for i in range(len(records))] == [s["label"] for s in serial]
