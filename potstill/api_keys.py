"""API keys come from an environment variable whose NAME a config gives; the key itself is never a config value.

A value that is not a variable name (e.g. a key pasted into the config) is refused without repeating it, so a
mistake does not copy the secret into an error message or a log.
"""
from __future__ import annotations

import os
import re

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def api_key_from_env(config_key: str, env_name: str, hint: str = "") -> str:
    """The key held by environment variable ``env_name`` (named by config key ``config_key``)."""
    if not _ENV_NAME.fullmatch(env_name):
        raise ValueError(f"{config_key} must be the NAME of an environment variable holding the key (letters, digits, "
                         "_), not the key itself; the value given is not shown")
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"{config_key}: the environment variable {env_name} is not set{hint}")
    return key
