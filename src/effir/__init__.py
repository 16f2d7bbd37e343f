"""effir: make LLM-based dense retrievers small and fast (EffiR: depth + width reduction, retrieval fine-tuning)."""

from .checkpoint import load
from .encoder import EmbeddingSettings, Encoder
from .utils import EffirError

__version__ = "0.1.0"
__all__ = ["EffirError", "EmbeddingSettings", "Encoder", "__version__", "load"]
