"""Quantized BANKING77 bundles on the real MiniLM backbone give a record the same answer
in any batch and from any thread (slow: uses the session's BANKING77 run, exports int4).

400 real test sentences: labels identical and scores within 1e-5 at batch sizes 1, 7 and
32; eight threads sharing one Predictor with batches of 7 agree with serial calls. The
dynamic int8 recipe these replace failed both (14 of 400 labels changed between batch
sizes 1 and 32; 192 of 4,800 threaded predictions disagreed with serial ones).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, shared_data

pytestmark = pytest.mark.slow

N_RECORDS = 400
TOL = 1e-5


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_bundle(request, banking77_run) -> Path:
    """The session's 150-step BANKING77 run (``tests/conftest.py``) exported by ``ptedge
    export --quantize int8|int4`` (defaults); int8 is the session's shared bundle. Read-only.

    int4 is written whatever its guard says: this module tests that answers do not depend
    on the batch or the thread, not accuracy (the 150-step run's refitted head loses 1.2
    dev points at int4, past the default 1-point limit; int8 stays under its guard).
    """
    if request.param == "int8":
        return request.getfixturevalue("banking77_int8_bundle")
    bundle = banking77_run.parent / "bundle-int4"
    run_cli("export", str(banking77_run), "--out", str(bundle), "--quantize", "int4",
            "--allow-accuracy-drop")  # fmt: skip
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
