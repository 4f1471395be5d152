"""`potstill generate`: datasets of teacher completions (docs/generation.md)."""
from potstill.generation.run import Summary, generate

__all__ = ["Summary", "generate"]
