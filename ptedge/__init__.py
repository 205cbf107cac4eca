"""ptedge: P-tuning prompts fused into a plain ONNX backbone for onnxruntime."""

__version__ = "0.1.0"
