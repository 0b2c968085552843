"""llama.cpp's GGUF files: Q8_0 and Q4_0 weights bit for bit, and their training configs.

``jqat.gguf`` needs the ``gguf`` package (``pip install 'jqat[gguf]'``).
"""

from jqat._src.gguf import config as config
from jqat._src.gguf import load as load
from jqat._src.gguf import load_metadata as load_metadata
from jqat._src.gguf import save as save

__all__ = (
  "config",
  "load",
  "load_metadata",
  "save",
)
