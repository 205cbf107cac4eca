"""One-shot GPU check for a lent CUDA machine (see tests/test_cuda.py for the tests).

Prints the stack, then: labels and scores of a bundle on onnxruntime's CUDA execution
provider against its CPU provider, and latency at batch 1 and 32 on both. Usage:

    python tools/gpu_check.py BUNDLE RECORDS

Not for CI: CI machines have no GPU.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from ptedge.data import read_records
    from ptedge.runtime import Predictor

    bundle, data = sys.argv[1], sys.argv[2]
    print("onnxruntime", ort.__version__, ort.get_available_providers())
    records = list(read_records(data))
    cpu = Predictor(bundle, threads=4)
    runs = {"cpu": cpu}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        runs["cuda"] = Predictor(
            bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        print("cuda session providers:", runs["cuda"].session.get_providers())
    ref, _ = cpu.scores(records, batch_size=1)
    for name, p in runs.items():
        s, _ = p.scores(records, batch_size=1)
        same = float((s.argmax(-1) == ref.argmax(-1)).mean())
        print(
            f"{name}: labels equal to cpu {same:.4f}, max |score diff| "
            f"{float(np.abs(s - ref).max()):.2e} on {len(records)} records"
        )
        for batch in (1, 32):
            recs = records[:batch]
            p.predict(recs, batch_size=batch)
            t0 = time.perf_counter()
            for _ in range(20):
                p.predict(recs, batch_size=batch)
            print(f"{name}: batch {batch}: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
