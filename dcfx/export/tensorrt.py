"""TensorRT: engines built from the ONNX export, and a runtime over them with fixed buffers.

The ``tensorrt`` format writes the ONNX files (``dcfx.export.onnx``), then builds
``full.plan``, ``shallow.plan`` and ``forecast.plan`` with the TensorRT Python API: one
optimisation profile each from the export's (min, opt, max) dimension ranges, fp16 or fp32,
and a timing cache (``timing.cache``) that later builds reuse. Every ONNX export also writes
``trtexec.sh``, the same builds as ``trtexec`` command lines, for users who build engines by
hand.

TensorRT is imported lazily: everything up to the engine build (profiles, plans, commands) is
plain Python and runs anywhere. At load, the manifest's TensorRT version and GPU are compared
with the current ones before an engine is deserialized.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcfx.export.loaded import ExportedPair
from dcfx.export.manifest import FORECAST, ArtifactError, GraphEntry, Manifest
from dcfx.export.program import ProgramPair
from dcfx.export.registry import register_format
from dcfx.export.trt_plan import DEFAULT_WORKSPACE, TIMING_CACHE, EngineBuild, build_plan
from dcfx.limits import MAX_GRAPH_PAIRS


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError(
            "the tensorrt format needs TensorRT (pip install tensorrt, on a machine with an NVIDIA GPU); "
            "without it, export format='onnx' and build engines with the commands in trtexec.sh"
        ) from e
    return tensorrt


def build_engine(build: EngineBuild, directory: Path, timing_cache: Path | None = None) -> None:
    """Builds one engine with the TensorRT Python API (needs TensorRT and a GPU).

    The timing cache is read from and written back to ``timing_cache`` (a file shared by
    builds; default: the export's own ``timing.cache``).

    Raises:
        RuntimeError: the ONNX parser or the builder failed (with TensorRT's messages).
    """
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(directory / build.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {build.onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace)
    if build.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: no TF32 matmuls and convolutions
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in build.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else directory / build.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {build.onnx}")
    (directory / build.engine).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def gpu_identity(device: torch.device | None = None) -> dict[str, Any]:
    """Returns what an engine is tied to: the GPU's name and compute capability."""
    index = (device.index if device is not None else None) or 0
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


@register_format("tensorrt", options=("precision", "workspace", "timing_cache", "opset"))
class TensorRTFormat:
    """Writes the ONNX export plus TensorRT engines, and loads the engines."""

    name = "tensorrt"

    def check_available(self) -> None:
        """Raises ImportError without TensorRT, RuntimeError without a CUDA GPU."""
        _tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("building TensorRT engines needs a CUDA GPU; export format='onnx' and use trtexec.sh")

    def write(
        self,
        programs: ProgramPair,
        out: Path,
        precision: str = "fp16",
        workspace: int = DEFAULT_WORKSPACE,
        timing_cache: str | Path | None = None,
        **onnx: Any,
    ) -> dict[str, Any]:
        """Writes the ONNX files, then builds full.plan, shallow.plan and forecast.plan.

        ``timing_cache``: a file that later builds reuse (read, then updated); the export
        keeps a copy as timing.cache either way.
        """
        from dcfx.export.onnx import OnnxFormat

        data = OnnxFormat().write(programs, out, **onnx)
        entries = {
            graph: GraphEntry(data["files"][graph], inputs, outputs)
            for graph, (_, inputs, outputs) in programs.programs().items()
        }
        plan = build_plan(entries, programs.dims, precision, workspace)
        for build in plan.values():
            build_engine(build, out, timing_cache)
        if timing_cache is not None:
            shutil.copyfile(timing_cache, out / TIMING_CACHE)
        trt = _tensorrt()
        return {
            **data,
            "files": {graph: build.engine for graph, build in plan.items()},
            "onnx_files": data["files"],
            "device": "cuda",
            "precision": precision,
            "tensorrt": trt.__version__,
            **gpu_identity(),
        }

    def load(
        self, directory: Path, manifest: Manifest, device: str | torch.device = "cuda", cuda_graph: bool = False
    ) -> TensorRTPair:
        """Returns the pair over the engines in ``directory``, after the version and GPU checks."""
        return TensorRTPair(directory, manifest, torch.device(device), cuda_graph)


def check_engine_compatible(manifest: Manifest, directory: Path, current: Mapping[str, Any]) -> None:
    """Raises ArtifactError when the engines were built for another TensorRT version or GPU.

    ``current`` holds ``tensorrt``, ``gpu`` and ``compute_capability`` of this machine.
    """
    built = manifest.format_data
    engine = manifest.graphs["full"].file
    for key in ("tensorrt", "compute_capability", "gpu"):
        if built.get(key) != current.get(key):
            raise ArtifactError(
                f"{directory / engine} was built for {key} {built.get(key)!r}, this machine has {current.get(key)!r}: "
                f"TensorRT engines run only where they were built; rebuild them (dcfx export --format tensorrt, or "
                f"trtexec.sh on the ONNX files)"
            )


class TensorRTPair(ExportedPair):
    """The engines with one execution context each; tensors are bound by address.

    The cache feature is bound as the full engine's output and the shallow engine's input at
    the runtime buffer's address, so it never moves; the forecast engine binds both of the
    runtime's feature buffers (the feature and the previous one) the same way. With
    ``cuda_graph``, each engine's launch is captured once per input shape (and feature
    buffers) into a CUDA graph and replayed: the other inputs (the forecast coefficient
    among them) are copied into static buffers first, the sample is copied out after.
    """

    def __init__(self, directory: Path, manifest: Manifest, device: torch.device, cuda_graph: bool) -> None:
        if device.type != "cuda":
            raise ValueError(f"TensorRT engines run on a CUDA device, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(manifest, device)
        trt = _tensorrt()
        check_engine_compatible(manifest, directory, {"tensorrt": trt.__version__, **gpu_identity(device)})
        object.__setattr__(self, "directory", directory)
        object.__setattr__(self, "runtime", trt.Runtime(trt.Logger(trt.Logger.WARNING)))
        object.__setattr__(self, "engines", {})
        object.__setattr__(self, "contexts", {})
        object.__setattr__(self, "cuda_graph", cuda_graph)
        object.__setattr__(self, "_graphs", OrderedDict())
        for graph in ("full", "shallow"):
            self._open(graph)

    def _open(self, graph: str) -> None:
        trt = _tensorrt()
        entry = self.manifest.graphs[graph]
        path = self.directory / entry.file
        data = path.read_bytes()  # hashed again: the bytes checked are the bytes deserialized
        if hashlib.sha256(data).hexdigest() != self.manifest.files[entry.file]["sha256"]:
            raise ArtifactError(f"{path} does not match its sha256 in the manifest: it was altered")
        with torch.cuda.device(self.device):
            engine = self.runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise ArtifactError(f"TensorRT {trt.__version__} could not deserialize {path}")
            _check_engine_io(trt, engine, entry, path)
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()

    def _run(self, graph: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        entry = self.manifest.graphs[graph]
        with torch.cuda.device(self.device):
            if not self.cuda_graph:
                self._bind(graph, entry, inputs, outputs)
                self._execute(graph)
                return
            self._replay(graph, entry, inputs, outputs)

    def _replay(
        self, graph: str, entry: GraphEntry, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
    ) -> None:
        # The cache feature (the full graph's second output, the shallow graph's last input)
        # and the previous feature (the forecast graph's input after it) are the runtime's
        # buffers: bound by their addresses, which are part of the key. Other inputs are
        # copied into static buffers; the sample output is copied out.
        fixed = _feature_buffers(graph, inputs, outputs)
        key = (graph, tuple(t.shape for t in inputs), tuple(t.data_ptr() for t in fixed))
        captured = self._graphs.get(key)
        if captured is None:
            static_in = [t if any(t is f for f in fixed) else t.clone() for t in inputs]
            static_out = [torch.empty_like(outputs[0]), *outputs[1:]]
            self._bind(graph, entry, static_in, static_out)
            self._execute(graph)  # warm-up: TensorRT allocates what it needs on the first run
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):  # captures on a side stream of torch's choosing
                self._execute(graph)
            captured = (cuda_graph, static_in, static_out)
            self._graphs[key] = captured
            # Per input shape: three engines, each bound to either of a generation's two buffers.
            if len(self._graphs) > MAX_GRAPH_PAIRS * 6:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        cuda_graph, static_in, static_out = captured
        for static, tensor in zip(static_in, inputs, strict=True):
            if static is not tensor:
                static.copy_(tensor)
        cuda_graph.replay()
        outputs[0].copy_(static_out[0])

    def _execute(self, graph: str) -> None:
        if not self.contexts[graph].execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {graph} engine")

    def _bind(
        self, graph: str, entry: GraphEntry, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
    ) -> None:
        context = self.contexts[graph]
        for spec, tensor in zip(entry.inputs, inputs, strict=True):
            # A 0-d input (the forecast coefficient) has one shape, fixed in the engine.
            if spec.shape and not context.set_input_shape(spec.graph_name, tuple(tensor.shape)):
                raise ValueError(f"the {graph} engine refuses {spec.name} of shape {tuple(tensor.shape)}")
            context.set_tensor_address(spec.graph_name, tensor.data_ptr())
        for spec, tensor in zip(entry.outputs, outputs, strict=True):
            shape = tuple(context.get_tensor_shape(spec.graph_name))
            if shape != tuple(tensor.shape):
                raise RuntimeError(
                    f"the {graph} engine makes {spec.name} of shape {shape}, the manifest says {tuple(tensor.shape)}"
                )
            context.set_tensor_address(spec.graph_name, tensor.data_ptr())


def _feature_buffers(
    graph: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    # The runtime's feature buffers a graph binds: written by the full graph, read by the
    # shallow graph, both (feature, previous) read by the forecast graph before its coefficient.
    if graph == "full":
        return (outputs[1],)
    if graph == FORECAST:
        return (inputs[-3], inputs[-2])
    return (inputs[-1],)


def _check_engine_io(trt: Any, engine: Any, entry: GraphEntry, path: Path) -> None:
    # The engine's tensors must be the manifest's: outputs are written by address into buffers
    # sized from the manifest.
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    modes = {n: engine.get_tensor_mode(n) for n in names}
    inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
    want_in = [s.graph_name for s in entry.inputs]
    want_out = [s.graph_name for s in entry.outputs]
    if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
        raise ArtifactError(
            f"{path} has inputs {inputs} and outputs {outputs}; the manifest says {want_in} and {want_out}"
        )
    dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }
    for spec in (*entry.inputs, *entry.outputs):
        dtype = dtypes.get(engine.get_tensor_dtype(spec.graph_name))
        if dtype != spec.torch_dtype:
            raise ArtifactError(
                f"{path}: tensor {spec.graph_name} is {dtype} in the engine, {spec.dtype} in the manifest"
            )
