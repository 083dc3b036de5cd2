"""Cut points: where a model is cut, found from the model spec's metadata, not from node names.

A cut names a place in the model by module paths (what the model spec knows), finds its
features in a captured graph by ``nn_module_stack``, and says how the two graphs are made:
what the full graph emits besides the sample, and how the shallow graph takes those
features in place of the part it skips.

- ``SkipCut``: a U-Net skip branch (DeepCache). The feature is the main-path input of an up
  layer, the ``hidden`` of its ``cat([hidden, skip])``; the shallow graph reads it instead.
- ``ResidualCut``: a transformer's block range (cache-dit's DBCache). Its feature is the
  residual the cached blocks add, ``h(after block n - B - 1) - h(before block F)``, per stream
  (image tokens; joint blocks also text tokens, concatenated along the tokens into one
  feature), which the full graph emits and the shallow graph adds to ``h(before block F)`` in
  place of the blocks it skips. The streams are found by the marks capture leaves
  (``dcfx.passes.marks``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import fx

from dcfx.models import BlockRange, UpLayer
from dcfx.passes.marks import marks, unmark


def module_path(node: fx.Node, prefix: str) -> str:
    """Returns the innermost module path of ``node`` without ``prefix`` ("" outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(prefix) :] if path.startswith(prefix) else path


def ran_in(node: fx.Node, path: str, prefix: str) -> bool:
    """Returns whether ``node`` ran inside a call of the module at ``path`` itself.

    Unlike ``in_module``, a node of a submodule called from outside (DiT's output head calls
    ``transformer_blocks[0].norm1.emb`` directly) did not run in the module's call.
    """
    stack = node.meta.get("nn_module_stack")
    return bool(stack) and any(entry[0] == prefix + path for entry in stack.values())


def in_module(node: fx.Node, path: str, prefix: str) -> bool:
    """Returns whether ``node`` was traced inside the module at ``path`` (or a child of it)."""
    own = module_path(node, prefix)
    return own == path or own.startswith(path + ".")


class Cut(Protocol):
    """Where the graphs are cut (see the module docstring)."""

    def locate(self, gm: fx.GraphModule, prefix: str) -> list[fx.Node]:
        """Returns the nodes of ``gm`` the cut reads (module paths inside ``gm`` start with ``prefix``)."""
        ...

    def feature_meta(self, located: list[fx.Node]) -> list[dict[str, Any]]:
        """Returns the ``meta`` (``val``) of each feature, in the order ``emit`` returns them."""
        ...

    def emit(self, graph: fx.Graph, located: list[fx.Node]) -> list[fx.Node]:
        """Returns the features the full graph emits besides the sample (nodes of ``graph``)."""
        ...

    def take(self, graph: fx.Graph, located: list[fx.Node], features: list[fx.Node]) -> None:
        """Rewires ``graph`` (a copy) to read the ``features`` placeholders instead of the skipped part."""
        ...


class SkipCut:
    """A U-Net skip branch: the main-path input of ``layer``, read from the cache on shallow steps."""

    def __init__(self, layer: UpLayer) -> None:
        self.layer = layer

    def locate(self, gm: fx.GraphModule, prefix: str) -> list[fx.Node]:
        """Returns ``[hidden]``: the main-path operand of the ``cat([hidden, skip])`` feeding the layer.

        In diffusers up blocks each resnet runs on ``cat([hidden, skip], dim=1)``, as does each
        output block of a latent-diffusion ``UNetModel``. The cat is found as the one whose
        users lie inside the layer's resnet, by ``nn_module_stack``, so no node name or block
        layout is assumed.

        Raises:
            ValueError: when the layer's input is not such a cat (an unsupported up block).
        """
        path = self.layer.path
        cats = [
            node
            for node in gm.graph.nodes
            if node.op == "call_function"
            and node.target is torch.ops.aten.cat.default
            and any(in_module(user, path, prefix) for user in node.users)
            and not in_module(node, path, prefix)
        ]
        if len(cats) != 1:
            raise ValueError(
                f"branch {self.layer.branch}: expected one cat([hidden, skip]) feeding {path}, found "
                f"{len(cats)}; dcfx supports up blocks that concatenate skip connections (diffusers "
                f"UpBlock2D, CrossAttnUpBlock2D, AttnUpBlock2D and alike; latent-diffusion output_blocks)"
            )
        hidden = cats[0].args[0][0]
        if not isinstance(hidden, fx.Node) or not isinstance(hidden.meta.get("val"), torch.Tensor):
            raise ValueError(f"branch {self.layer.branch}: the input of {path} is not a tensor node")
        return [hidden]

    def feature_meta(self, located: list[fx.Node]) -> list[dict[str, Any]]:
        """The feature is the hidden state: its own meta."""
        return [{k: node.meta[k] for k in ("val", "tensor_meta") if k in node.meta} for node in located]

    def emit(self, graph: fx.Graph, located: list[fx.Node]) -> list[fx.Node]:
        """The full graph emits the hidden state itself."""
        return list(located)

    def take(self, graph: fx.Graph, located: list[fx.Node], features: list[fx.Node]) -> None:
        """The hidden state's uses read the feature; the deep part that fed it is left dead."""
        for node, feature in zip(located, features, strict=True):
            node.replace_all_uses_with(feature)


class ResidualCut:
    """A transformer's block range: the residual its middle blocks add, per stream, as one feature.

    ``locate`` returns the marks: the streams entering the first cached block (``in.<name>``)
    and leaving the last (``out.<name>``), for the streams that leave it (an SD3 last block
    with ``context_pre_only`` returns no text stream; PixArt's text states are conditioning,
    not a stream). Two streams are concatenated along the tokens (dimension 1).
    """

    def __init__(self, place: BlockRange) -> None:
        self.place = place

    def locate(self, gm: fx.GraphModule, prefix: str) -> list[fx.Node]:
        """Returns ``[in_0, ..., out_0, ...]``: the marks of each stream that leaves the cached blocks.

        Raises:
            ValueError: the capture left no marks (the blocks did not run) or a stream that
                leaves the blocks never entered them.
        """
        found = marks(gm.graph)
        names = sorted(tag[len("out.") :] for tag in found if tag.startswith("out."))
        if not names:
            raise ValueError(
                f"{self.place.name}: no stream left {self.place.exit}; dcfx cuts transformers whose blocks return "
                "their hidden states (a tensor, or the (encoder_hidden_states, hidden_states) pair)"
            )
        missing = [name for name in names if f"in.{name}" not in found]
        if missing:
            raise ValueError(
                f"{self.place.name}: the stream(s) {missing} leave {self.place.exit} but never entered "
                f"{self.place.entry}"
            )
        shapes = [found[f"out.{name}"].meta["val"] for name in names]
        if (len(shapes) > 1 and len({(v.ndim, v.shape[-1], v.dtype) for v in shapes}) != 1) or shapes[0].ndim != 3:
            raise ValueError(f"{self.place.name}: the streams {names} are not (batch, tokens, width) of one width")
        return [found[f"in.{name}"] for name in names] + [found[f"out.{name}"] for name in names]

    @staticmethod
    def _split(located: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        half = len(located) // 2
        return located[:half], located[half:]

    def feature_meta(self, located: list[fx.Node]) -> list[dict[str, Any]]:
        """The feature: the residuals of the streams, concatenated along the tokens."""
        from torch._guards import detect_fake_mode

        ins, outs = self._split(located)
        values = [n.meta["val"] for n in (*ins, *outs)]
        with detect_fake_mode(values) or contextlib.nullcontext():
            residuals = [o.meta["val"] - i.meta["val"] for i, o in zip(ins, outs, strict=True)]
            val = residuals[0] if len(residuals) == 1 else torch.cat(residuals, dim=1)
        return [{"val": val}]

    def emit(self, graph: fx.Graph, located: list[fx.Node]) -> list[fx.Node]:
        """The full graph emits ``out - in`` per stream (concatenated); its marks are removed."""
        ins, outs = self._split(located)
        meta = self.feature_meta(located)[0]
        last = outs[-1] if _before(outs[0], outs[-1]) else outs[0]
        with graph.inserting_before(last.next):  # in order, after both streams are out
            residuals = [
                graph.call_function(torch.ops.aten.sub.Tensor, (o.args[0], i.args[0]))
                for i, o in zip(ins, outs, strict=True)
            ]
            feature = residuals[0]
            if len(residuals) > 1:
                feature = graph.call_function(torch.ops.aten.cat.default, (residuals, 1))
        feature.meta = dict(meta)
        unmark(graph)
        return [feature]

    def take(self, graph: fx.Graph, located: list[fx.Node], features: list[fx.Node]) -> None:
        """Each stream leaving the cached blocks becomes ``in + residual``; the blocks are left dead."""
        ins, outs = self._split(located)
        (feature,) = features
        bounds: list[tuple[Any, Any]] = [(0, _END)]
        if len(ins) == 2:
            # The first stream's token count, read from its input (static or symbolic alike).
            first_out = outs[0] if _before(outs[0], outs[1]) else outs[1]
            with graph.inserting_before(first_out):
                split = graph.call_function(torch.ops.aten.sym_size.int, (ins[0].args[0], 1))
            bounds = [(0, split), (split, _END)]
        for (i, o), (start, end) in zip(zip(ins, outs, strict=True), bounds, strict=True):
            with graph.inserting_before(o):
                residual = feature
                if len(ins) > 1:
                    residual = graph.call_function(torch.ops.aten.slice.Tensor, (feature, 1, start, end))
                # in + residual, as cache-dit adds them.
                restored = graph.call_function(torch.ops.aten.add.Tensor, (i.args[0], residual))
            o.replace_all_uses_with(restored)
        unmark(graph)


_END = 2**63 - 1  # a slice to the end


def _before(a: fx.Node, b: fx.Node) -> bool:
    """Returns whether node ``a`` comes before ``b`` in their graph."""
    for node in a.graph.nodes:
        if node is a:
            return True
        if node is b:
            return False
    return False


def cut_for(place: UpLayer | BlockRange) -> Cut:
    """Returns the cut at ``place``: a skip branch of a U-Net, or a transformer's block range."""
    return ResidualCut(place) if isinstance(place, BlockRange) else SkipCut(place)
