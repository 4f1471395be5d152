"""Loss layer. Importing any of it registers every objective: the cross-tokenizer terms (uld, gold, alm) live in
their own module, imported here so that the registry (losses/divergences.py) is complete for every user."""
from potstill.losses import crosstok_terms  # noqa: F401
