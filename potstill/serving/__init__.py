"""`potstill serve`: a local causal LM behind the OpenAI-compatible API (docs/generation.md)."""
from potstill.serving.app import build_app

__all__ = ["build_app"]
