"""Nested mappings such as a run config as flat ``section.key`` dicts: resume compares configs key by key, and
trackers store the config as flat hyperparameters."""
from __future__ import annotations


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.1}} → {'train.lr': 0.1}; nested dict values (student.config) are flattened too."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
