"""effir: make LLM-based dense retrievers small and fast (EffiR: depth + width reduction, retrieval fine-tuning)."""

from ._version import __version__
from .asymmetric import load
from .encoder import AsymmetricEncoder, EmbeddingSettings, Encoder
from .utils import EffirError

__all__ = ["AsymmetricEncoder", "EffirError", "EmbeddingSettings", "Encoder", "__version__", "load"]
