import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def shared_dir() -> Path:
    """Returns ../shared beside the checkout (DCFX_SHARED overrides)."""
    return Path(os.environ.get("DCFX_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def reference_schedules() -> dict:
    import json

    path = shared_dir() / "reference" / "nonuniform_schedules.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: CI runs with ../shared beside the checkout (or set DCFX_SHARED)")
    return json.loads(path.read_text())
