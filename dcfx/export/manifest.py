"""manifest.json: what an export directory holds, and the checks made before anything runs.

The manifest ties the graphs of an export together (full, shallow and forecast: ``GRAPHS``):
the format, the versions that wrote it, the model's config (and its hash), the DeepCache
config, every input and output with its shape expressions and dtype, the dimension ranges,
and the sha256 of every file. A seal, the
sha256 of the rest of the manifest, catches a manifest edited by hand. Reading it verifies all
of that, and that the directory holds no symbolic link and no file the manifest does not list;
a directory is written to a temporary sibling and renamed into place, so an interrupted export
never leaves a directory that looks complete.

These checks guard against accidents (a truncated copy, a file taken from another export, a
hand edit); they are not signatures: whoever can write the directory can forge a whole export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcfx.export.shapes import DimRange, TensorSpec

MANIFEST = "manifest.json"
# 2: the manifest carries a seal. Version 1 manifests (unsealed) are refused: export again.
# The forecast graph came without a new version: ``graphs`` maps names to entries, and an
# export without the forecast graph still loads (it cannot forecast; ``dcfx.load`` says so).
FORMAT_VERSION = 2
# The graphs an export holds, in the order formats write them; the forecast graph, the
# shallow graph on a forecast of the feature (``dcfx.passes.forecast``), is optional.
GRAPHS = ("full", "shallow", "forecast")
FORECAST = "forecast"
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An export directory that cannot be trusted or used: missing, altered or incompatible."""


@dataclass
class GraphEntry:
    """One exported graph: its file (relative to the directory), inputs and outputs."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "file": self.file,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphEntry:  # noqa: D102
        return cls(
            data["file"],
            [TensorSpec.from_dict(s) for s in data["inputs"]],
            [TensorSpec.from_dict(s) for s in data["outputs"]],
        )


@dataclass
class Manifest:
    """The contents of manifest.json (see the module docstring)."""

    format: str
    versions: dict[str, str]
    model: dict[str, Any]
    deepcache: dict[str, Any]
    dtype: str
    dims: dict[str, DimRange]
    graphs: dict[str, GraphEntry]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_data: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Returns the manifest as JSON-able data (without its seal)."""
        return {
            "format_version": self.format_version,
            "format": self.format,
            "versions": self.versions,
            "model": self.model,
            "deepcache": self.deepcache,
            "dtype": self.dtype,
            "dims": {name: dim.to_dict() for name, dim in self.dims.items()},
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "format_data": self.format_data,
            "checks": self.checks,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Returns the manifest of ``data`` (``to_dict``'s output)."""
        return cls(
            format=data["format"],
            versions=dict(data["versions"]),
            model=dict(data["model"]),
            deepcache=dict(data["deepcache"]),
            dtype=data["dtype"],
            dims={name: DimRange(name, **fields) for name, fields in data["dims"].items()},
            graphs={name: GraphEntry.from_dict(g) for name, g in data["graphs"].items()},
            files=dict(data["files"]),
            format_data=dict(data.get("format_data", {})),
            checks=dict(data.get("checks", {})),
            format_version=int(data["format_version"]),
        )

    def write(self, directory: Path) -> None:
        """Hashes every file in ``directory`` into ``files`` and writes manifest.json last."""
        self.files = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
            rel = path.relative_to(directory).as_posix()
            self.files[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}
        data = self.to_dict()
        (directory / MANIFEST).write_text(json.dumps({**data, "seal": seal(data)}, indent=2) + "\n")


def seal(data: Mapping[str, Any]) -> str:
    """Returns the seal of manifest data: the sha256 of its canonical JSON, less any seal."""
    body = {k: v for k, v in data.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_sha256(config: Mapping[str, Any]) -> str:
    """Returns the sha256 of a model config (canonical JSON: sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def sha256(path: Path) -> str:
    """Returns the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | os.PathLike[str], verify_files: bool = True) -> Manifest:
    """Returns the verified manifest of an export directory.

    Checks that the manifest is there, of the format version this dcfx reads and sealed, and
    (unless ``verify_files`` is False) that every listed file exists with its recorded size
    and sha256, and that the directory holds nothing else: no unlisted file, no link.

    Raises:
        ArtifactError: naming the file and what is wrong with it.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory (expected a dcfx export)")
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{path} is missing: {directory} is not a complete dcfx export")
    try:
        data = json.loads(path.read_text())
        version = int(data["format_version"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path} is not a dcfx manifest: {e}") from e
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {version}; this dcfx reads up to {FORMAT_VERSION}: upgrade dcfx to load it"
        )
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {version}, written by an older dcfx; this one reads version "
            f"{FORMAT_VERSION}: export again"
        )
    if data.get("seal") != seal(data):
        raise ArtifactError(
            f"{path} was edited after export (its seal does not match its contents); export again rather than edit it"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path} is malformed: {e!r}") from e
    if set(GRAPHS[:2]) - set(manifest.graphs) or set(manifest.graphs) - set(GRAPHS):
        raise ArtifactError(
            f"{path} lists the graphs {sorted(manifest.graphs)}; an export holds {', '.join(GRAPHS[:2])} and "
            f"optionally {FORECAST}"
        )
    for entry in manifest.graphs.values():
        if entry.file not in manifest.files:
            raise ArtifactError(f"{path} does not list the sha256 of graph file {entry.file!r}")
    if config_sha256(manifest.model.get("config", {})) != manifest.model.get("config_sha256"):
        raise ArtifactError(f"{path}: the model config does not match its config_sha256: the manifest was altered")
    if verify_files:
        check_contents(directory, manifest)
        for rel, info in manifest.files.items():
            try:
                verify_file(directory, rel, info)
            except (KeyError, TypeError) as e:
                raise ArtifactError(f"{path} lists {rel!r} without a valid size and sha256: {e!r}") from e
    return manifest


def check_contents(directory: Path, manifest: Manifest) -> None:
    """Raises ArtifactError for a symbolic link in ``directory``, or a file the manifest does not list.

    A graph could otherwise read a file no hash covers (an ONNX graph names its external data
    files), or a link could point anywhere on the machine.
    """
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link (to {os.readlink(path)}); an export holds plain files only")
        if path.is_file() and rel != MANIFEST and rel not in manifest.files:
            raise ArtifactError(f"{path} is not listed in the manifest: the directory was altered after export")


def verify_file(directory: Path, rel: str, info: Mapping[str, Any]) -> Path:
    """Returns the path of ``rel`` after checking its size and sha256 against ``info``.

    Raises:
        ArtifactError: the file is missing, escapes the directory, or differs.
    """
    path = (directory / rel).resolve()
    if directory.resolve() not in path.parents:
        raise ArtifactError(f"manifest lists {rel!r}, which lies outside {directory}")
    if not path.is_file():
        raise ArtifactError(f"{directory / rel} is missing (listed in the manifest)")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise ArtifactError(f"{directory / rel} has {size} bytes, the manifest says {info['bytes']}: it was altered")
    if sha256(path) != info["sha256"]:
        raise ArtifactError(f"{directory / rel} does not match its sha256 in the manifest: it was altered")
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``target``; renames it to ``target`` when the block succeeds.

    On an error the temporary directory is removed and ``target`` is untouched. An existing
    ``target`` is replaced only with ``overwrite`` (and only once the new one is complete).

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is False.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (or --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
