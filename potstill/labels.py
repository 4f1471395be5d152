"""The label convention shared by the data layer, the loss path and evaluation (Hugging Face's): labels are
aligned with ``input_ids`` and ``IGNORE_INDEX`` marks positions that carry no loss."""
from __future__ import annotations

IGNORE_INDEX = -100
