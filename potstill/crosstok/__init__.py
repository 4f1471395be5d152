"""Cross-tokenizer distillation: aligning a teacher's and a student's tokenisations of the same text by bytes."""
from potstill.crosstok.alignment import Alignment, Chunk, ExactMatch, TokenSpans, align, byte_spans

__all__ = ["Alignment", "Chunk", "ExactMatch", "TokenSpans", "align", "byte_spans"]
