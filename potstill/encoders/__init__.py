"""Classifier and encoder distillation through the one loop (docs/encoders.md): sequence-classification KD (the
pooled representation + the classification head through the fused loss), LELP pseudo-subclasses, and
sentence-embedding KD (pooled embeddings, cosine / MSE / relational)."""
