"""The fault tests reuse the workflow integration tests' platform helpers."""

from __future__ import annotations

import sys
from pathlib import Path

# tests/ has no packages (pytest's rootdir-relative imports): make wf_helpers importable.
sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))
