"""effir: make LLM-based dense retrievers small and fast (EffiR: depth + width reduction, retrieval fine-tuning)."""

from .asymmetric import load
from .encoder import AsymmetricEncoder, EmbeddingSettings, Encoder
from .utils import EffirError

__version__ = "0.1.0"
__all__ = ["AsymmetricEncoder", "EffirError", "EmbeddingSettings", "Encoder", "__version__", "load"]
