"""AOTInductor: each graph compiled ahead of time into a .pt2 package (C++ and a shared library).

``full.pt2``, ``shallow.pt2`` and ``forecast.pt2`` come from
``torch._inductor.aoti_compile_and_package``; they run from Python here or from C++
(``torch::inductor::AOTIModelPackageLoader``) without Python. Loading goes through the package
loader directly: no exported program is deserialized and nothing is unpickled. Each package
holds its own copy of the weights it uses (the format has no shared weight file); the shallow
and forecast graphs' are a small part of the full graph's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcfx.export.loaded import ExportedPair
from dcfx.export.manifest import ArtifactError, Manifest
from dcfx.export.program import ProgramPair
from dcfx.export.registry import register_format

# Freezing lets Inductor fold the weights into the kernels' constants (as the in-process
# inductor backend does).
DEFAULT_INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}


@register_format("aoti", options=("inductor_configs",))
class AotiFormat:
    """Writes and loads AOTInductor packages (see the module docstring)."""

    name = "aoti"

    def check_available(self) -> None:
        """Raises ImportError when this torch has no AOTInductor package support."""
        if not hasattr(torch._inductor, "aoti_compile_and_package") or not hasattr(torch._C, "_aoti"):
            raise ImportError(f"torch {torch.__version__} has no AOTInductor packaging; upgrade torch")

    def write(
        self, programs: ProgramPair, out: Path, inductor_configs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Compiles full.pt2, shallow.pt2 and forecast.pt2; returns the format data."""
        configs = {**DEFAULT_INDUCTOR_CONFIGS, **(inductor_configs or {})}
        files = {}
        for graph, (program, _, _) in programs.programs().items():
            files[graph] = f"{graph}.pt2"
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(out / files[graph]), inductor_configs=dict(configs)
            )
        device = programs.example[0].device
        return {
            "files": files,
            "device": str(device),
            "inductor_configs": {k: repr(v) for k, v in configs.items()},
        }

    def load(self, directory: Path, manifest: Manifest, device: str | torch.device = "cpu") -> AotiPair:
        """Returns the pair running the packages in ``directory``."""
        return AotiPair(directory, manifest, torch.device(device))


class AotiPair(ExportedPair):
    """The packages loaded by ``AOTIModelPackageLoader``; outputs are copied into place."""

    def __init__(self, directory: Path, manifest: Manifest, device: torch.device) -> None:
        super().__init__(manifest, device)
        exported_on = torch.device(manifest.format_data.get("device", "cpu"))
        if exported_on.type != device.type:
            raise ArtifactError(
                f"{directory} holds AOTInductor code for {exported_on.type}; it cannot run on {device.type}: export "
                f"again with the model on {device.type}"
            )
        object.__setattr__(self, "directory", directory)
        object.__setattr__(self, "loaders", {})
        for graph in ("full", "shallow"):
            self._open(graph)

    def _open(self, graph: str) -> None:
        index = self.device.index if self.device.index is not None else -1
        path = self.directory / self.manifest.graphs[graph].file
        try:
            self.loaders[graph] = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        except RuntimeError as e:
            raise ArtifactError(f"{path} could not be loaded by this torch ({torch.__version__}): {e}") from e

    def _run(self, graph: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        # AOTInductor code assumes the strides it was traced with (contiguous): an expanded
        # timestep (stride 0) would be read past its storage. ExportedPair passes contiguous inputs.
        results = self.loaders[graph].run(list(inputs))
        for target, result in zip(outputs, results, strict=True):
            target.copy_(result)
