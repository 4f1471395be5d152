"""Teacher signals from outside the training loop: the on-disk teacher-signal cache (``cache.py``)."""
