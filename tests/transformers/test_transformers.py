"""Diffusion transformers: the block-range cut, in graphs and in pipelines, on SD3, Flux, PixArt and DiT.

What a user does, in order, on one pipeline: a plain generation, then dcfx with interval 1
(every step full: the same latents, exactly), generations back to back, then caching.
Equality with cache-dit is in test_cache_dit.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import dcfx
from dcfx.branches import block_ranges
from dcfx.models import BlockRange, TransformerSpec, spec_for
from dcfx.passes import build_graph_pair
from tests.fixtures import tiny_unet
from tests.transformers.tiny import BUILDERS, MODELS


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    t = BUILDERS[request.param]()
    t.pipe.set_progress_bar_config(disable=True)
    return t


def _call(t):
    """One transformer call as the pipeline makes it, recorded from a plain generation's first step."""
    seen = {}

    def hook(module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        seen.setdefault("kwargs", dict(bound.arguments))

    handle = t.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        t.generate(2)
    finally:
        handle.remove()
    return {k: v for k, v in seen["kwargs"].items() if k != "return_dict"}


def test_recognised_by_structure(tiny):
    spec = spec_for(tiny.transformer)
    assert isinstance(spec, TransformerSpec)
    blocks = spec.blocks(tiny.transformer)
    assert len(blocks) == 4
    if tiny.name == "flux":
        assert blocks[1:3] == ("transformer_blocks.1", "single_transformer_blocks.0")

    class Derived(type(tiny.transformer)):
        pass

    copy = Derived.from_config(tiny.transformer.config)
    assert isinstance(spec_for(copy), TransformerSpec)


@pytest.mark.parametrize("first,last", [(1, 1), (2, 0), (0, 2)])
def test_graphs_full_exact_shallow_adds_the_residual(tiny, first, last):
    model = tiny.transformer
    spec = spec_for(model)
    (names, tensors), _ = spec.flatten(model, (), _call(tiny))
    pair = build_graph_pair(model, (first, last), names, tensors)
    with torch.no_grad():
        reference = model(**dict(_call(tiny)), return_dict=False)[0]
        out, feature = pair.full(*tensors)
        shallow = pair.shallow(*tensors, feature)
    assert torch.equal(out, reference)
    # in + (out - in) is out up to one rounding of each element.
    scale = reference.abs().max()
    assert (shallow - reference).abs().max() <= 1e-5 * scale
    # The cached blocks are gone from the shallow graph, the others kept.
    kept_blocks = [layer for layer in pair.kept_layers if "blocks." in layer]
    blocks = spec.blocks(model)
    assert kept_blocks == list(blocks[:first]) + list(blocks[len(blocks) - last :])


def test_interval_one_is_the_plain_pipeline_exactly_back_to_back(tiny):
    plain = tiny.generate(5, seed=3)
    plain_other = tiny.generate(5, seed=4)
    dcfx.enable(tiny.pipe, interval=1, first=1, last=1)
    try:
        assert torch.equal(tiny.generate(5, seed=3), plain)
        assert torch.equal(tiny.generate(5, seed=4), plain_other)
        assert torch.equal(tiny.generate(5, seed=3), plain)
        assert tiny.pipe.transformer.stats["shallow"] == 0
    finally:
        dcfx.disable(tiny.pipe)
    assert not isinstance(tiny.pipe.transformer, dcfx.DeepCacheUNet)


def test_caching_counts_steps_by_the_pipelines_scheduler(tiny):
    dcfx.enable(tiny.pipe, interval=3, first=1, last=0)
    try:
        first = tiny.generate(7, seed=1)
        calls = tiny.calls_per_step  # Wan calls the transformer once per guidance branch
        assert tiny.pipe.transformer.stats == {"full": 3 * calls, "shallow": 4 * calls}
        again = tiny.generate(7, seed=1)
        assert torch.equal(first, again)  # no state leaks from one generation into the next
        assert torch.isfinite(first).all()
    finally:
        dcfx.disable(tiny.pipe)


def test_block_ranges_count_the_cached_blocks(tiny):
    infos = block_ranges(tiny.transformer)
    n = 4
    assert [(i.first, i.last) for i in infos] == [(f, b) for f in range(n) for b in range(n - f)]
    by_cut = {(i.first, i.last): i for i in infos}
    for (f, b), info in by_cut.items():
        assert len(info.cached) == n - f - b
        assert 0 < info.flop_share < 1
        if f + b + 1 < n:  # one more block run every step costs more
            assert by_cut[(f, b + 1)].flop_share > info.flop_share
    assert dcfx.branches(tiny.transformer)[0] == infos[0]


def test_refusals_name_the_knobs(tiny):
    with pytest.raises(ValueError, match="branch=1 and first=/last= given together"):
        dcfx.DeepCacheConfig(branch=1, first=1)
    with pytest.raises(ValueError, match="branch=0 cuts a U-Net"):
        dcfx.compile(tiny.transformer, branch=0)
    with pytest.raises(ValueError, match="leave no block to cache: this model has 4 blocks"):
        dcfx.compile(tiny.transformer, first=2, last=2)
    with pytest.raises(ValueError, match="first must be an int >= 0"):
        dcfx.compile(tiny.transformer, first=-1)
    # No knob at all: the default block range.
    runtime = dcfx.compile(tiny.transformer, interval=2)
    assert runtime.deepcache_config.cut == (1, 0)
    with pytest.raises(ValueError, match="cut at first=1, last=0"):
        runtime.reschedule(first=2)
    assert runtime.reschedule(interval=4).deepcache_config.cut == (1, 0)


def test_a_unet_refuses_first_and_last():
    unet = tiny_unet()
    with pytest.raises(
        ValueError, match="cut a diffusion transformer at a block range; UNet2DConditionModel is a U-Net"
    ):
        dcfx.compile(unet, first=1, last=1)


def test_block_range_bounds():
    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    assert BlockRange(1, 1, blocks).deep_paths() == ["transformer_blocks.1"]
    with pytest.raises(ValueError, match="first \\+ last must be at most 2"):
        BlockRange(2, 1, blocks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_inductor_equals_eager_with_one_build_per_shape(name):
    tiny = BUILDERS[name]()
    tiny.pipe.set_progress_bar_config(disable=True)
    dcfx.enable(tiny.pipe, first=1, last=1, interval=3)
    eager = tiny.generate(7, seed=1)
    dcfx.enable(tiny.pipe, first=1, last=1, interval=3, backend="inductor")
    runtime = tiny.pipe.transformer
    for _ in range(2):
        out = tiny.generate(7, seed=1)
        torch.testing.assert_close(out, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    assert runtime.graph_builds == 1
    assert runtime.stats == {"full": 6, "shallow": 8}
