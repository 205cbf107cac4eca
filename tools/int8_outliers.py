"""Why per-tensor dynamic int8 breaks SmolLM2 and per-block int8 does not: activation outliers.

Runs the real backbone (PyTorch, fp32) on real sentences and, for every Linear of every
layer, looks at its input activations X (tokens x channels):

- outliers: the largest per-channel absmax over the median per-channel absmax;
- the relative error ||X W^T - Q(X) W^T|| / ||X W^T|| of quantizing X to int8 with
  one scale per tensor (onnxruntime's dynamic ``DynamicQuantizeLinear``, recipe ``all``)
  against one scale per block of 32 channels of each token (``MatMulNBits`` with
  ``accuracy_level`` 4, the builder's int8/int4 recipes); weights kept float, so the
  error is the activations' alone.

    python tools/int8_outliers.py --model models/smollm2-135m \
        --data ../shared/data/sst2/dev.tsv --field sentence --n 32

Prints one row per kind of Linear (median and worst over layers) and writes JSON with
``--out``. Not a benchmark: it explains a measured accuracy loss.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


def quant_per_tensor(x: np.ndarray) -> np.ndarray:
    """Asymmetric uint8 with one scale and zero point for the whole tensor (ORT dynamic)."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def quant_per_block(x: np.ndarray, block: int = 32) -> np.ndarray:
    """Symmetric int8 with one scale per block of ``block`` channels of each token."""
    t, c = x.shape
    xb = x.reshape(t, c // block, block)
    scale = np.abs(xb).max(-1, keepdims=True) / 127
    scale[scale == 0] = 1.0
    return (np.clip(np.round(xb / scale), -127, 127) * scale).reshape(t, c)


def main(argv: list[str] | None = None) -> None:
    import torch

    from ptedge.data import read_records
    from ptedge.model import load_backbone

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--field", default="sentence")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    lm = load_backbone(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = [str(r[args.field]) for r in list(read_records(args.data))[: args.n]]
    stats: dict[str, list[dict]] = defaultdict(list)
    hooks = []
    for name, mod in lm.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            kind = name.split(".")[-1]

            def hook(mod, inp, out, kind=kind, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).numpy()  # (tokens, C)
                w = mod.weight.detach().numpy()  # (N, C)
                ref = x @ w.T
                ch = np.abs(x).max(0)  # (C,)
                err = {}
                for q, f in (("per_tensor", quant_per_tensor), ("per_block32", quant_per_block)):
                    err[q] = float(np.linalg.norm(f(x) @ w.T - ref) / np.linalg.norm(ref))
                stats[kind].append(
                    {
                        "layer": name,
                        "outlier_ratio": float(ch.max() / np.median(ch)),
                        "absmax": float(ch.max()),
                        **{f"rel_err_{k}": v for k, v in err.items()},
                    }
                )

            hooks.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        for text in texts:
            lm(**tok(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    summary = {}
    print(
        f"{'linear':<10} {'outlier max/median (median, worst layer)':>42} "
        f"{'rel. error per tensor':>24} {'per block of 32':>18}"
    )
    for kind, rows in stats.items():
        by_layer: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_layer[r["layer"]].append(r)
        layer = {
            k: {m: float(np.mean([r[m] for r in v])) for m in v[0] if m != "layer"}
            for k, v in by_layer.items()
        }
        col = {m: [v[m] for v in layer.values()] for m in next(iter(layer.values()))}
        summary[kind] = {
            m: {"median": float(np.median(v)), "worst": float(np.max(v))} for m, v in col.items()
        }
        s = summary[kind]
        print(
            f"{kind:<10} {s['outlier_ratio']['median']:>20.1f} {s['outlier_ratio']['worst']:>21.1f}"
            f" {s['rel_err_per_tensor']['median']:>11.4f} {s['rel_err_per_tensor']['worst']:>12.4f}"
            f" {s['rel_err_per_block32']['median']:>9.4f} {s['rel_err_per_block32']['worst']:>8.4f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
