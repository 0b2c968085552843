"""compressed-tensors checkpoints (the format vLLM serves) of jqat's quantized Dense layers.

Needs torch and the compressed-tensors package: ``pip install 'jqat[compressed-tensors]'``.
"""

from jqat._src.compressed_tensors import Layer as Layer
from jqat._src.compressed_tensors import layers as layers
from jqat._src.compressed_tensors import load as load
from jqat._src.compressed_tensors import save as save

__all__ = ("Layer", "layers", "load", "save")
