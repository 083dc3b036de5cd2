"""Marks: where a transformer's cut streams enter and leave the cached blocks, made visible to FX.

A captured graph says which module each node ran in, but not which tensors a block took and
returned as its streams (image tokens, text tokens) and which as conditioning. While a
transformer is captured, hooks on the first and the last cached block pass each stream through
``dcfx::mark`` (a copy, tagged ``in.<name>`` or ``out.<name>``): the cut finds the streams by
tag, rewires the graph around them, and removes every mark (``unmark``) before anything runs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

STREAMS = ("hidden_states", "encoder_hidden_states")


@torch.library.custom_op("dcfx::mark", mutates_args=())
def mark(x: torch.Tensor, tag: str) -> torch.Tensor:
    """Returns a copy of ``x``; the node stands for the stream ``tag`` in a captured graph."""
    return x.clone()


@mark.register_fake
def _(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


def is_mark(node: fx.Node) -> bool:
    """Returns whether ``node`` is a ``dcfx::mark``."""
    return node.op == "call_function" and node.target is torch.ops.dcfx.mark.default


def marks(graph: fx.Graph) -> dict[str, fx.Node]:
    """Returns the graph's marks by tag.

    Raises:
        ValueError: a tag marked twice (a cached block that ran more than once).
    """
    found: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if is_mark(node):
            tag = str(node.args[1])
            if tag in found:
                raise ValueError(f"the stream {tag!r} was marked twice: a block of the cut ran more than once")
            found[tag] = node
    return found


def unmark(graph: fx.Graph) -> None:
    """Removes every mark from ``graph``: its uses read the marked tensor itself."""
    for node in list(graph.nodes):
        if is_mark(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _streams_in(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    bound = inspect.signature(block.forward).bind_partial(*args, **kwargs).arguments
    return {name: bound[name] for name in STREAMS if isinstance(bound.get(name), torch.Tensor)}


def _named_outputs(output: Any, inputs: dict[str, torch.Tensor]) -> dict[int | None, str]:
    """Names what a block returned: a tensor is ``hidden_states``; a pair is matched to its inputs.

    A pair is matched to the input streams by shape where that tells them apart, else read as
    diffusers' joint blocks return it: ``(encoder_hidden_states, hidden_states)``.
    """
    if isinstance(output, torch.Tensor):
        return {None: "hidden_states"}
    if not isinstance(output, (tuple, list)) or len(output) != 2:
        raise TypeError(f"a transformer block returned {type(output).__name__}; dcfx expects a tensor or a pair")
    names = {0: "encoder_hidden_states", 1: "hidden_states"}
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    if len(shapes) == 2 and shapes["hidden_states"] != shapes["encoder_hidden_states"]:
        for i, value in enumerate(output):
            if isinstance(value, torch.Tensor):
                for name, shape in shapes.items():
                    if tuple(value.shape) == shape:
                        names[i] = name
    return {i: name for i, name in names.items() if isinstance(output[i], torch.Tensor)}


@contextlib.contextmanager
def marked(model: nn.Module, entry: str, exit: str) -> Iterator[None]:  # noqa: A002
    """Marks the streams entering the block at path ``entry`` and leaving the block at ``exit``.

    Hooks on ``model``'s blocks (a captured copy's), removed on leaving.
    """
    first, last = model.get_submodule(entry), model.get_submodule(exit)

    def enter(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        signature = inspect.signature(block.forward).bind_partial(*args, **kwargs)
        for name in STREAMS:
            value = signature.arguments.get(name)
            if isinstance(value, torch.Tensor):
                signature.arguments[name] = torch.ops.dcfx.mark(value, f"in.{name}")
        return signature.args, signature.kwargs

    def leave(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        named = _named_outputs(output, _streams_in(block, args, kwargs))
        if None in named:
            return torch.ops.dcfx.mark(output, f"out.{named[None]}")
        out = list(output)
        for i, name in named.items():
            out[i] = torch.ops.dcfx.mark(out[i], f"out.{name}")
        return type(output)(out) if isinstance(output, tuple) else out

    handles = [
        first.register_forward_pre_hook(enter, with_kwargs=True),
        last.register_forward_hook(leave, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
