"""The MiniLM BANKING77 bundles that tools/bench_web.py and tools/bench_ray.py measure.

Built by the same commands as the tests' ``banking77_int8_bundle`` fixture (tests/conftest.py):
``ptedge train`` (150 steps x 32, linear head) then ``ptedge export`` with and without
``--quantize int8``; reused from ``work`` while the recipe and ``EXPORT_REV`` hold.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from _bench_common import EXPORT_REV, Cache, need_data

TEMPLATE = "[P:3] {text} [P:3] [MASK]"
TRAIN_ARGS = [
    "--template", TEMPLATE, "--label-field", "category", "--head", "linear",
    "--steps", "150", "--batch-size", "32",
]  # fmt: skip


def _cli(out: Path, *args: str) -> None:
    """``ptedge ARGS --out OUT`` in a fresh interpreter, OUT emptied first."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "from ptedge.cli import main; main()", *args, "--out", str(out)]
    subprocess.run(cmd, check=True)


def banking77_bundles(work: Path, fresh: bool = False) -> dict[str, Path]:
    """{"int8": bundle, "fp32": bundle} of one BANKING77 run, built when missing."""
    from ptedge.backbones import fetch

    cache = Cache(work, fresh)
    train_csv = need_data("banking77", "train.csv")
    model = fetch("minilm-l6", quiet=True)
    params = {"train": str(train_csv), "args": TRAIN_ARGS, "export_rev": EXPORT_REV}
    run = cache.get(
        work / "run",
        params,
        lambda: _cli(work / "run", "train", "--model", str(model), "--train", str(train_csv),
                     *TRAIN_ARGS),
        "ptedge.json",
    )  # fmt: skip
    out = {}
    for name, extra in (("int8", ["--quantize", "int8"]), ("fp32", [])):
        path = work / f"bundle-{name}"
        out[name] = cache.get(
            path,
            params | {"export": extra},
            lambda p=path, e=extra: _cli(p, "export", str(run), *e),
            "ptedge.json",
        )
    return out
