"""docs/reliability.md names, for each guarantee, the test that proves it: every name must exist, so a renamed or
deleted test cannot leave a guarantee pointing at nothing."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_reliability_md_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    named, current = [], None
    # `file.py::name` sets the file; a following `::name` in the same cell refers to that file
    for file, name in re.findall(r"`(?:(test_\w+\.py))?(?:::(\w+))?`", text):
        current = file or current
        if name:
            named.append((current, name))
        elif file:
            named.append((file, None))
    assert len(named) > 40
    missing = []
    for file, name in named:
        source = (ROOT / "tests" / file).read_text() if (ROOT / "tests" / file).exists() else ""
        if not source or (name and not re.search(rf"^def {name}\(", source, re.M)):
            missing.append(f"{file}::{name}" if name else file)
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
