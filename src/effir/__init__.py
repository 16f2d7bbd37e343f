"""effir: make LLM-based dense retrievers small and fast (EffiR: depth + width reduction, retrieval fine-tuning)."""

from ._version import __version__
from .checkpoint import load
from .encoder import EmbeddingSettings, Encoder
from .utils import EffirError

__all__ = ["EffirError", "EmbeddingSettings", "Encoder", "__version__", "load"]
