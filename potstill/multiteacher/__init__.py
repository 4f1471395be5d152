"""Multi-teacher KD (docs/multi-teacher.md): several teachers mixed per position in probability space as one target
of the one fused loss path. ``settings`` checks the config, ``weights`` computes the mixture weights (pure tensor
functions), ``teachers`` loads the extra teachers and builds each batch's mixture, ``domains`` measures the
per-domain held-out losses DDK weighting reads."""
