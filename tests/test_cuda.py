"""CUDA paths: training on a GPU in half precision, and bundles on onnxruntime's CUDA
execution provider. Each test skips cleanly where there is no GPU (or no
onnxruntime-gpu); tools/gpu_check.py measures the same on a real bundle. Results on
an H200: docs/results/cuda.md."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_training_on_cuda_half_backbone(tiny, sentiment_file, tmp_path, dtype):
    from ptedge.model import load_run
    from ptedge.train import TrainArgs, train

    cfg = train(
        TrainArgs(
            model=str(tiny("llama")),
            train=str(sentiment_file),
            template="[P:2] {sentence} [P:2] It was [MASK]",
            verbalizer={"0": "terrible", "1": "great"},
            steps=10,
            batch_size=4,
            device="cuda",
            dtype=dtype,
            out=str(tmp_path / dtype),
        ),
        progress=False,
    )
    assert cfg.steps == 10
    _, model, *_ = load_run(tmp_path / dtype)  # weights saved in fp32, loadable on CPU
    assert next(model.encoder.parameters()).dtype == torch.float32
    assert torch.isfinite(model.encoder()).all()


@needs_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _cuda_ep(),
    reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)",
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_bundle_on_cuda_provider_matches_cpu(tiny, sentiment_file, tmp_path, dtype):
    from ptedge.data import read_records
    from ptedge.export import ExportArgs, export
    from ptedge.export.half import fp16_tolerance
    from ptedge.runtime import Predictor
    from ptedge.train import TrainArgs, train

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train(
        TrainArgs(
            model=str(tiny("bert")),
            train=str(sentiment_file),
            head="linear",
            template="[P:2] {sentence} [P] [MASK]",
            steps=10,
            batch_size=4,
            device="cpu",
            out=str(run),
        ),
        progress=False,
    )
    export(ExportArgs(runs=[str(run)], out=str(tmp_path / "fp32")))
    export(ExportArgs(runs=[str(run)], out=str(bundle), dtype=dtype))
    records = list(read_records(sentiment_file))
    cpu = Predictor(tmp_path / "fp32")
    gpu = Predictor(bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    a, _ = cpu.scores(records)
    b, _ = gpu.scores(records)
    assert np.abs(a - b).max() < (1e-3 if dtype == "fp32" else fp16_tolerance(a))
    assert [r["label"] for r in cpu.predict(records)] == [r["label"] for r in gpu.predict(records)]
    for batch in (1, 32):
        recs = (records * 32)[:batch]
        gpu.predict(recs, batch_size=batch)
        t0 = time.perf_counter()
        for _ in range(20):
            gpu.predict(recs, batch_size=batch)
        ms = (time.perf_counter() - t0) / 20 * 1e3
        print(f"cuda provider {dtype} batch {batch}: {ms:.2f} ms")
