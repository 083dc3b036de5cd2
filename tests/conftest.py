import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers run side by side (-n 2 on 2 cores): one thread each, no oversubscription. Most of
    # the suite's time is single-threaded Python (torch.export, Inductor's codegen) anyway.
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--inductor-matrix",
        action="store_true",
        help="also run every pipeline under Inductor (about 40 min on 2 CPU cores; CI runs one)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--inductor-matrix"):
        return
    skip = pytest.mark.skip(reason="one Inductor compile per pipeline: run with --inductor-matrix")
    for item in items:
        if "inductor_matrix" in item.keywords:
            item.add_marker(skip)


DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def reference_schedules() -> dict:
    """The reference implementation's non-uniform vectors (copied from shared/reference into tests/data)."""
    import json

    return json.loads((DATA / "nonuniform_schedules.json").read_text())
