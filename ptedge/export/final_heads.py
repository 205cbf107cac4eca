"""The shipped linear heads, swapped into the finished graph.

A run whose dev split was carved from its training file ships a head solved on the
training and the dev records together (``ptedge.head_fit.refit``). Every judgement export
makes on those dev records (parity, the int8/int4 guard, the temperature, the rejection
rule) must be made without them, so the graph is built, checked and calibrated with the
head fitted without them (``ptedge.export.runs``). At the end, ``swap_in`` writes each
shipped head's weight and bias over that head's float initializers (heads stay float in
every recipe), found by their values, and checks the result against PyTorch: on the parity
records the scores must move by what the shipped head adds on the same features,
``f (W_ship - W_judged)^T + (b_ship - b_judged)``, within the graph's precision.

Not responsible for: fitting heads, calibration, the manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ptedge.export import decoder_graph
from ptedge.export.parity import PARITY_ATOL, ParityError
from ptedge.export.scoring import onnx_scores, unfused_scores

SWAP_RTOL = 0.25  # of the largest expected move: int8 features differ from PyTorch's a little
MATCH_RTOL, MATCH_ATOL = 2e-3, 2e-7  # an initializer "is" a head tensor (fp16 graphs round)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _matches(model, old: np.ndarray) -> list[tuple[object, bool]]:
    """(initializer, transposed) of every initializer holding ``old`` (L, H) or (L,)."""
    from onnx import numpy_helper

    found = []
    for t in model.graph.initializer:
        if tuple(t.dims) not in (old.shape, old.T.shape) or t.data_type not in (1, 10, 11):
            continue  # float, float16, double only
        arr = numpy_helper.to_array(t).astype(np.float32)
        for transposed, want in ((False, old), (True, old.T)):
            if arr.shape == want.shape and np.allclose(arr, want, MATCH_RTOL, MATCH_ATOL):
                found.append((t, transposed))
                break
    return found


def _write(t, new: np.ndarray, transposed: bool) -> None:
    from onnx import numpy_helper

    dtype = numpy_helper.to_array(t).dtype
    t.CopyFrom(numpy_helper.from_array((new.T if transposed else new).astype(dtype), t.name))


def _expected_move(run, records: list[dict], final: dict) -> np.ndarray:
    """PyTorch's scores (B, L) with the shipped head less those with the judged one; the
    shipped head is left in place."""
    before = unfused_scores(run, records)
    run.task.model.head.load_state_dict(final)
    return unfused_scores(run, records) - before


def swap_in(path: Path, runs, samples: list[list[dict]]) -> dict[str, dict]:
    """Per task whose run ships another head than the graph was judged with: what was
    swapped and how it checked (``{"fit": ..., "check": ...}``). A head whose tensors
    cannot be told apart in the graph stays the judged one, said on stderr and in the
    report; a swap whose scores move otherwise than PyTorch's raises ``ParityError``."""
    import onnx

    todo = [(r, s) for r, s in zip(runs, samples, strict=True) if r.final_head is not None]
    if not todo:
        return {}
    session = _session(path)
    before = {r.name: onnx_scores(session, r, s) for r, s in todo}
    del session
    model = onnx.load(str(path))
    report, swapped = {}, []
    for run, _ in todo:
        head = run.task.model.head
        pairs = [
            (head.weight.detach().numpy(), run.final_head["weight"].numpy()),
            (head.bias.detach().numpy(), run.final_head["bias"].numpy()),
        ]
        found = [_matches(model, old) for old, _ in pairs]
        if any(len(f) != 1 for f in found):
            why = (
                f"its weight and bias are not each one initializer of the graph "
                f"({len(found[0])} and {len(found[1])} found)"
            )
            _log(f"head {run.name}: {why}; the bundle keeps the head fitted without dev")
            report[run.name] = {"fit": "training records (dev records not added)", "why": why}
            continue
        for (t, transposed), (_, new) in zip((f[0] for f in found), pairs, strict=True):
            _write(t, new, transposed)
        swapped.append(run.name)
    if not swapped:
        return report
    if path.with_name(path.name + ".data").exists():
        decoder_graph.save(model, path)  # weights apart, as they were
    else:
        onnx.save(model, str(path))
    del model
    session = _session(path)
    for run, recs in todo:
        if run.name not in swapped:
            continue
        want = _expected_move(run, recs, run.final_head)
        got = onnx_scores(session, run, recs) - before[run.name]
        diff = float(np.abs(got - want).max())
        tol = max(PARITY_ATOL, SWAP_RTOL * float(np.abs(want).max()))
        _log(
            f"head {run.name}: the head fitted with the dev records swapped in; scores moved "
            f"as PyTorch's within {diff:.2e} (tolerance {tol:.1e}) on {len(recs)} records"
        )
        if diff > tol:
            raise ParityError(
                f"task {run.name}: swapping in the shipped head moved the scores otherwise "
                f"than in PyTorch ({diff:.3e} > {tol:.3e})"
            )
        report[run.name] = {
            "fit": "training and dev records",
            "check": {"max_abs_diff": diff, "tolerance": tol, "n": len(recs)},
        }
    return report
