"""Diffusion transformers: the block-range cut, in graphs and in pipelines, on every tiny model and Flux-dev.

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
    return build(request.param)


def build(name: str):
    t = BUILDERS[name]()
    t.pipe.set_progress_bar_config(disable=True)
    return t


FAST_CUTS = {(1, name) for name in MODELS} | {(0, "sd3")}  # (first, model) of the fast graph cases


def slow_if(slow: bool) -> tuple:
    """The marks of a parametrised case: the slow tier where another model or cut covers the same fast."""
    return (pytest.mark.slow,) if slow else ()


# Wan's graphs take the longest to capture (10 s a cut under load): its cut is checked fast in
# pipelines (interval one, cache-dit) and here in the slow tier. F1B1 runs fast on the other
# models, F0B2 on SD3, F2B0 in the slow tier.
GRAPH_CASES = [
    pytest.param(
        name, first, last, id=f"{name}-{first}-{last}", marks=slow_if(name == "wan" or (first, name) not in FAST_CUTS)
    )
    for name in MODELS
    for first, last in [(1, 1), (2, 0), (0, 2)]
]


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


@pytest.mark.parametrize(("name", "first", "last"), GRAPH_CASES)
def test_graphs_full_exact_shallow_adds_the_residual(name, first, last):
    tiny = build(name)
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


# Wan's two calls a step are counted fast by test_cache_dit.py (its stats): the slow tier here.
@pytest.mark.parametrize("tiny", [pytest.param(name, marks=slow_if(name == "wan")) for name in MODELS], indirect=True)
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


# One list (SD3) and two chained lists (Flux) fast; the others, Wan at its default 64x64 latents
# (13 s under load) among them, in the slow tier.
@pytest.mark.parametrize("name", [pytest.param(name, marks=slow_if(name not in ("sd3", "flux"))) for name in MODELS])
def test_block_ranges_count_the_cached_blocks(name):
    tiny = build(name)
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


@pytest.mark.parametrize("name", [*MODELS, "flux-dev"])
def test_the_example_call_passes_what_the_pipeline_passes(name):
    # What dcfx.branches, dcfx.tune and an export without example= trace: the pipeline's inputs
    # (PixArt's and Sana's prompt mask, Flux-dev's guidance), or an export would lack them.
    t = build(name)
    model = t.transformer
    spec = spec_for(model)
    passed = t.recorded_call()
    example = spec.example_call(model, tuple(passed["hidden_states"].shape), torch.float32, torch.device("cpu"))
    tensors = {key: value for key, value in passed.items() if isinstance(value, torch.Tensor)}
    assert {key for key, value in example.items() if isinstance(value, torch.Tensor)} == set(tensors)
    assert all(example[key].ndim == value.ndim for key, value in tensors.items())
    if "encoder_attention_mask" in example:  # the tokenizers' mask: integers, one per prompt token
        assert example["encoder_attention_mask"].shape == example["encoder_hidden_states"].shape[:2]
        assert example["encoder_attention_mask"].dtype == torch.long
    if "guidance" in example:  # FluxPipeline's: float32, one per row
        assert example["guidance"].dtype == passed["guidance"].dtype == torch.float32


def test_flux_dev_takes_its_guidance_through_the_cut():
    t = build("flux-dev")
    model = t.transformer
    spec = spec_for(model)
    call = spec.example_call(model, spec.sample_shape(model, 2, 8, 8), torch.float32, torch.device("cpu"))
    stronger = {**call, "guidance": call["guidance"] * 2}
    fast = dcfx.compile(model, first=1, last=0, interval=1)
    with torch.no_grad():
        plain, plain_stronger = (model(**c, return_dict=False)[0] for c in (call, stronger))
        assert torch.equal(fast(**call, return_dict=False)[0], plain)
        assert torch.equal(fast(**stronger, return_dict=False)[0], plain_stronger)  # an input, not a constant
    assert not torch.equal(plain, plain_stronger) and fast.graph_builds == 1
    infos = dcfx.branches(model, spec.sample_shape(model, 2, 8, 8))  # from the example call: every cut's FLOP share
    assert len(infos) == 10 and all(0 < info.flop_share < 1 for info in infos)

    # In FluxPipeline, which passes the guidance scale to the transformer on every call.
    plain = t.generate(4, seed=3)
    dcfx.enable(t.pipe, first=1, last=0, interval=1)
    try:
        assert torch.equal(t.generate(4, seed=3), plain)
        t.pipe.transformer = t.pipe.transformer.reschedule(interval=2)  # the same graphs
        cached = t.generate(4, seed=3)
        assert t.pipe.transformer.stats["shallow"] == 2 and t.pipe.transformer.graph_builds == 1  # steps 1, 3
        assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    finally:
        dcfx.disable(t.pipe)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_inductor_equals_eager_with_one_build_per_shape(name):
    tiny = build(name)
    dcfx.enable(tiny.pipe, first=1, last=1, interval=3)
    eager = tiny.generate(7, seed=1)
    dcfx.enable(tiny.pipe, first=1, last=1, interval=3, backend="inductor")
    runtime = tiny.pipe.transformer
    for _ in range(2):
        out = tiny.generate(7, seed=1)
        torch.testing.assert_close(out, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    assert runtime.graph_builds == 1
    assert runtime.stats == {"full": 6, "shallow": 8}
