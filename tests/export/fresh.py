"""Runs a loaded export in a fresh Python process in which diffusers cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["diffusers"] = None  # any import of diffusers now raises ImportError
    import numpy as np, torch
    import dcfx
    unet = dcfx.load(sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2] + "/sample.npy", allow_pickle=False))
    ehs = torch.from_numpy(np.load(sys.argv[2] + "/ehs.npy", allow_pickle=False))
    for i, t in enumerate((900, 800, 700)):
        out = unet(x, t, encoder_hidden_states=ehs)
        np.save(f"{sys.argv[2]}/out{i}.npy", out.sample.numpy(), allow_pickle=False)
    assert "diffusers" not in sys.modules or sys.modules["diffusers"] is None
    print(type(out).__name__, unet.stats["full"], unet.stats["shallow"])
    """
)


def run_fresh(export_dir: Path, work: Path, sample: torch.Tensor, ehs: torch.Tensor) -> tuple[list[torch.Tensor], str]:
    """Returns the outputs of three calls (t = 900, 800, 700) and the process's stdout."""
    np.save(work / "sample.npy", sample.numpy(), allow_pickle=False)
    np.save(work / "ehs.npy", ehs.numpy(), allow_pickle=False)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(export_dir), str(work)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [torch.from_numpy(np.load(work / f"out{i}.npy", allow_pickle=False)) for i in range(3)]
    return outs, proc.stdout
