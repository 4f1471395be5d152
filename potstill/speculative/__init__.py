"""Speculative decoding with a draft model: the lossless decoder (``decode.py``) and the acceptance math that
predicts its speed-up from how close the draft's distribution is to the target's (``acceptance.py``)."""
