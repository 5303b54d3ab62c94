"""dsq: quantized DeepSeek-V2 inference."""

__version__ = "0.1.0"
