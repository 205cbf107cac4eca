"""Quantized BANKING77 bundles on the real MiniLM backbone give a record the same answer
in any batch and from any thread (slow: trains and exports once per module).

400 real test sentences: labels identical and scores within 1e-5 at batch sizes 1, 7 and
32; eight threads sharing one Predictor with batches of 7 agree with serial calls. The
dynamic int8 recipe these replace failed both (14 of 400 labels changed between batch
sizes 1 and 32; 192 of 4,800 threaded predictions disagreed with serial ones).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

pytestmark = pytest.mark.slow

N_RECORDS = 400
TOL = 1e-5


def _cli(*args: str) -> None:
    """``ptedge ARGS`` in a fresh interpreter, one thread (a busy 2-core machine)."""
    cmd = [sys.executable, "-c", "from ptedge.cli import main; main()", *args]
    env = {"OMP_NUM_THREADS": "1"} | dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        pytest.fail(f"ptedge {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="module")
def banking77_run(tmp_path_factory) -> Path:
    """A MiniLM BANKING77 run (the benchmarks' template, 150 steps x 32). Read-only."""
    pytest.importorskip("torch")
    from ptedge.backbones import fetch

    run = tmp_path_factory.mktemp("b77q") / "banking77"
    _cli(
        "train",
        "--model",
        str(fetch("minilm-l6")),
        "--train",
        str(shared_data("banking77", "train.csv")),
        "--template",
        "[P:3] {text} [P:3] [MASK]",
        "--label-field",
        "category",
        "--head",
        "linear",
        "--steps",
        "150",
        "--batch-size",
        "32",
        "--out",
        str(run),
    )
    return run


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_bundle(request, banking77_run) -> Path:
    """The run exported by ``ptedge export --quantize int8|int4`` (defaults). Read-only.

    int4 is written whatever its guard says: this module tests that answers do not depend
    on the batch or the thread, not accuracy (the 150-step run's refitted head loses 1.2
    dev points at int4, past the default 1-point limit; int8 stays under its guard).
    """
    bundle = banking77_run.parent / f"bundle-{request.param}"
    lenient = ["--allow-accuracy-drop"] if request.param == "int4" else []
    _cli("export", str(banking77_run), "--out", str(bundle), "--quantize", request.param, *lenient)
    return bundle


@pytest.fixture(scope="module")
def test_records() -> list[dict]:
    from ptedge.data import read_records

    return list(read_records(shared_data("banking77", "test.csv")))[:N_RECORDS]


def _same(a: list[dict], b: list[dict]) -> None:
    """Same labels; scores within TOL."""
    assert [r["label"] for r in a] == [r["label"] for r in b]
    gap = max(
        abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b, strict=True) for k in x["scores"]
    )
    assert gap <= TOL


def test_answers_do_not_depend_on_the_batch(quantized_bundle, test_records):
    from ptedge.runtime import Predictor

    p = Predictor(quantized_bundle)
    raw = {b: p.scores(test_records, batch_size=b)[0] for b in (1, 7, 32)}
    for b in (7, 32):
        assert (raw[b].argmax(-1) == raw[1].argmax(-1)).all()
        assert np.abs(raw[b] - raw[1]).max() <= TOL
    _same(p.predict(test_records, batch_size=7), p.predict(test_records, batch_size=1))


def test_threads_sharing_a_predictor_agree_with_serial_calls(quantized_bundle, test_records):
    from ptedge.runtime import Predictor

    p = Predictor(quantized_bundle)
    chunks = [test_records[i : i + 7] for i in range(0, len(test_records), 7)]
    serial = [p.predict(c, batch_size=7) for c in chunks]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # 3 x 58 calls in flight, 8 at a time
            threaded = list(pool.map(lambda c: p.predict(c, batch_size=7), chunks))
            _same([r for c in threaded for r in c], [r for c in serial for r in c])
