"""ONNX: the graphs by the torch.onnx dynamo exporter, one shared weights file, onnxruntime.

Files: ``full.onnx``, ``shallow.onnx`` and ``forecast.onnx`` (graphs only) and ``weights.bin``,
which holds every initializer once: the shallow and forecast graphs' weights are a subset of the
full graph's, so their initializers point into the same file. ``trtexec.sh`` holds the
equivalent TensorRT engine builds. The runtime runs the graphs in onnxruntime with IO binding:
inputs are read from and outputs written to torch tensors in place, the cache feature straight
into the runtime's buffer, and the forecast graph reads both feature buffers where they lie.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from dcfx.export.loaded import ExportedPair
from dcfx.export.manifest import ArtifactError, GraphEntry, Manifest
from dcfx.export.program import ProgramPair
from dcfx.export.registry import register_format
from dcfx.export.trt_plan import trtexec_script

logger = logging.getLogger(__name__)

WEIGHTS = "weights.bin"
TRTEXEC = "trtexec.sh"
OPSET = 20
# Tensors below this stay inside the graph file; large ones are aligned like onnx does (for mmap).
_INLINE_BYTES = 1024
_ALIGN_THRESHOLD = 1 << 20
_ALIGNMENT = 1 << 16


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError('the ONNX format needs onnx: pip install "dcfx[onnx]"') from e
    return onnx


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError('running ONNX exports needs onnxruntime: pip install "dcfx[onnx]"') from e
    return onnxruntime


@register_format("onnx", options=("opset",))
class OnnxFormat:
    """Writes and loads the ONNX format (see the module docstring)."""

    name = "onnx"

    def check_available(self) -> None:
        """Raises ImportError when onnx or onnxruntime is missing."""
        _onnx()
        _ort()

    def write(self, programs: ProgramPair, out: Path, opset: int = OPSET) -> dict[str, Any]:
        """Writes full.onnx, shallow.onnx, forecast.onnx, weights.bin and trtexec.sh; returns the format data."""
        onnx = _onnx()
        graphs = programs.programs()
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            models = {}
            for graph, (program, _, outputs) in graphs.items():
                path = Path(tmp) / f"{graph}.onnx"
                drop_identity_squeezes(program)
                torch.onnx.export(
                    program,
                    f=str(path),
                    dynamo=True,
                    external_data=True,
                    opset_version=opset,
                    output_names=[s.graph_name for s in outputs],
                    # onnxscript's rewrites (0.7.2) take a constant within 1e-8 of 0 for 0 and
                    # drop Sana's ``x / (d + 1e-15)`` epsilon: 0 / 0 where eager gives 0.
                    # onnxruntime folds the graph itself when it opens it.
                    optimize=False,
                    verbose=False,
                )
                models[graph] = onnx.load(str(path), load_external_data=False)
            for graph, model in models.items():
                _, inputs, outputs = graphs[graph]
                _set_io_shapes(model, inputs, outputs)
            sizes = _share_weights(models, Path(tmp), out / WEIGHTS)
            for graph, model in models.items():
                onnx.save(model, str(out / f"{graph}.onnx"))
        for graph in models:
            onnx.checker.check_model(str(out / f"{graph}.onnx"))
        entries = {
            graph: GraphEntry(f"{graph}.onnx", inputs, outputs) for graph, (_, inputs, outputs) in graphs.items()
        }
        (out / TRTEXEC).write_text(trtexec_script(entries, programs.dims))
        return {
            "files": {graph: entry.file for graph, entry in entries.items()},
            "device": "cpu",
            "opset": opset,
            "onnx": onnx.__version__,
            "weights": sizes,
        }

    def load(
        self,
        directory: Path,
        manifest: Manifest,
        device: str | torch.device = "cpu",
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
    ) -> OnnxPair:
        """Returns the onnxruntime pair over the export in ``directory``."""
        return OnnxPair(directory, manifest, torch.device(device), providers, session_options)


def drop_identity_squeezes(program: ExportedProgram) -> int:
    """Removes from ``program`` (in place) the squeezes of dimensions that are never 1; returns how many.

    ``aten.squeeze`` of a dimension of size 1 drops it and of any other size does nothing; the
    ONNX exporter (checked on torch 2.13) writes an ONNX Squeeze for either, which fails at run
    time on a size other than 1 (PixArt squeezes its token axis, which has one token only in
    a one-token image). A dynamic size that torch.export bounds away from 1 (its dynamic sizes
    start at 2) makes the squeeze a no-op, and it goes.
    """
    graph = program.graph_module.graph
    removed = 0
    for target in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
        for node in list(graph.find_nodes(op="call_function", target=target)):
            source, dims = node.args[0], node.args[1]
            value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor):
                continue
            dims = [dims] if isinstance(dims, int) else list(dims)
            if dims and all(_never_one(value.shape[d]) for d in dims):
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                removed += 1
    if removed:
        program.graph_module.recompile()
    return removed


def _never_one(size: Any) -> bool:
    # A symbolic size whose bounds (over the export's ranges) exclude 1.
    if not isinstance(size, torch.SymInt):
        return False
    node = size.node
    return bool(node.shape_env.bound_sympy(node.expr).lower >= 2)


def _set_io_shapes(model: Any, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
    # Inputs and outputs carry the manifest's dimension names (batch, height, height/2, ...);
    # intermediate shape annotations name the exporter's own symbols, so they are dropped and
    # left to onnxruntime's and TensorRT's shape inference.
    for values, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        if [v.name for v in values] != [s.graph_name for s in specs]:
            raise RuntimeError(f"ONNX graph I/O {[v.name for v in values]} differ from {[s.graph_name for s in specs]}")
        for value, spec in zip(values, specs, strict=True):
            dims = value.type.tensor_type.shape.dim
            for dim, expr in zip(dims, spec.shape, strict=True):
                if isinstance(expr, int):
                    dim.dim_value = expr
                else:
                    dim.dim_param = expr
    del model.graph.value_info[:]


def _share_weights(models: dict[str, Any], source: Path, target: Path) -> dict[str, int]:
    """Moves every large initializer of ``models`` into ``target``, each distinct tensor once."""
    offsets: dict[bytes, tuple[int, int]] = {}
    sizes = {"file_bytes": 0}
    with open(target, "wb") as f:
        for graph, model in models.items():
            total = new = 0
            for tensor in model.graph.initializer:
                data = _tensor_bytes(tensor, source)
                if data is None or len(data) < _INLINE_BYTES:
                    if data is not None and tensor.data_location == tensor.EXTERNAL:
                        _inline(tensor, data)
                    continue
                total += len(data)
                key = hashlib.sha256(data).digest()
                if key not in offsets:
                    if len(data) >= _ALIGN_THRESHOLD:
                        f.write(b"\0" * (-f.tell() % _ALIGNMENT))
                    offsets[key] = (f.tell(), len(data))
                    f.write(data)
                    new += len(data)
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                del tensor.external_data[:]
                for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                tensor.data_location = tensor.EXTERNAL
            sizes[f"{graph}_weight_bytes"] = total
            sizes[f"{graph}_new_bytes"] = new
        sizes["file_bytes"] = f.tell()
    return sizes


def _tensor_bytes(tensor: Any, base: Path) -> bytes | None:
    if tensor.data_location == tensor.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return None  # typed fields (small constants): left in the graph


def _inline(tensor: Any, data: bytes) -> None:
    del tensor.external_data[:]
    tensor.data_location = tensor.DEFAULT
    tensor.raw_data = data


class OnnxPair(ExportedPair):
    """The graphs in onnxruntime sessions, run with IO binding over torch tensors."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        device: torch.device,
        providers: Sequence[Any] | None,
        session_options: Any,
    ) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"dcfx runs ONNX exports on cpu or cuda devices, not {device}")
        super().__init__(manifest, device)
        ort = _ort()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                stream = str(torch.cuda.current_stream(device).cuda_stream)
                providers = [("CUDAExecutionProvider", {"device_id": device.index or 0, "user_compute_stream": stream})]
        if isinstance(providers, str) or not isinstance(providers, Sequence):
            raise TypeError(f"providers must be a list of onnxruntime provider names, got {providers!r}")
        available = ort.get_available_providers()
        missing = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:
            raise ValueError(f"onnxruntime providers {missing} are not available here; available: {available}")
        object.__setattr__(self, "_session_args", (directory, session_options or ort.SessionOptions(), providers))
        object.__setattr__(self, "sessions", {})
        for graph in ("full", "shallow"):
            self._open(graph)

    def _open(self, graph: str) -> None:
        directory, options, providers = self._session_args
        entry: GraphEntry = self.manifest.graphs[graph]
        session = _ort().InferenceSession(str(directory / entry.file), options, providers=list(providers))
        got = [i.name for i in session.get_inputs()]
        want = [s.graph_name for s in entry.inputs]
        if got != want:
            raise ArtifactError(f"{directory / entry.file} takes inputs {got}, the manifest says {want}")
        self.sessions[graph] = session

    def _run(self, graph: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        entry = self.manifest.graphs[graph]
        binding = self.sessions[graph].io_binding()
        for bind, specs, tensors in (
            (binding.bind_input, entry.inputs, inputs),
            (binding.bind_output, entry.outputs, outputs),
        ):
            for spec, tensor in zip(specs, tensors, strict=True):
                bind(
                    spec.graph_name,
                    self.device.type,
                    self.device.index or 0,
                    _numpy_dtype(tensor.dtype),
                    tuple(tensor.shape),
                    tensor.data_ptr(),
                )
        self.sessions[graph].run_with_iobinding(binding)


def _numpy_dtype(dtype: torch.dtype) -> Any:
    import numpy as np

    table = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.float64: np.float64,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.bool: np.bool_,
    }
    if dtype not in table:
        raise TypeError(f"onnxruntime IO binding does not take {dtype}; export in float32 or float16")
    return table[dtype]
