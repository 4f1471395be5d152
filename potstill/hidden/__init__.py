"""Hidden-state KD (docs/hidden-state.md): layer map, projections, attention relations, as extra loss terms of the
one loop. The pure losses are in ``potstill.losses.hidden``."""
