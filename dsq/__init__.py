"""dsq: quantized DeepSeek-V2 inference."""

from dsq.api import Model, load_quantized
from dsq.errors import DsqError

__version__ = "0.1.0"
__all__ = ["DsqError", "Model", "__version__", "load_quantized"]
