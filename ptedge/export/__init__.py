"""The export side: trained runs -> a fused, checked bundle onnxruntime runs without PyTorch.

One module per job, each importing only those listed before it (never back up):

- ``half``, ``fusion``, ``mobile``: fp16 conversion, onnxruntime's encoder fusions, ORT
  format (torch-free; ``mobile`` runs where no torch is installed);
- ``runs``: loading run folders onto one backbone, the records checks run on;
- ``scoring``: running exported graphs and the reference PyTorch model on records;
- ``parity``: the checks every exported graph must pass (``ParityError``);
- ``task_graph``, ``decoder``: ONNX export of classification/vocabulary task graphs and
  of KV-cache decoders by tracing (TorchScript, optimum);
- ``bundle``: the manifest, file hashes, atomic writing;
- ``guard``: the accuracy guard that decides which quantized graph ships;
- ``quant_graph``, ``quantize``: the graph rewrites quantization is made of, and the
  int8/int4 recipes, tried under the guard;
- ``builder``, ``decoder_graph``: onnxruntime-genai's model builder in its own
  environment, and the edits that graft prompt rows and task heads into its graphs;
- ``causal``: Llama-style causal LMs through the builder (task graphs, decoders, their
  int8/int4 recipes under the same guard);
- ``genai``: ``--format genai``, folders onnxruntime-genai loads as they are;
- ``calibrate``: the temperature and rejection threshold fitted on the shipped model;
- ``pipeline``: ``ptedge export`` itself (``ExportArgs``, ``export``), re-exported here.

Importing this package loads nothing heavy; ``ExportArgs`` and ``export`` load torch on
first use.
"""

from __future__ import annotations

__all__ = ["ExportArgs", "export"]


def __getattr__(name: str):
    if name in __all__:
        from ptedge.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ptedge.export' has no attribute {name!r}")
