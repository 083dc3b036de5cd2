"""IP-Adapter and T2I-Adapter in real pipelines, and which of their inputs a shallow step reads.

IP-Adapter: ``StableDiffusionPipeline`` with an adapter loaded by ``pipe.load_ip_adapter`` from
a state dict (tests/pipelines/builders.py), fed ``ip_adapter_image_embeds`` or, with a tiny image
encoder, ``ip_adapter_image``; the U-Net gets ``added_cond_kwargs={"image_embeds": [...]}`` and
runs diffusers' IP attention processors. T2I-Adapter: ``StableDiffusionAdapterPipeline``, whose
U-Net calls carry ``down_intrablock_additional_residuals``. dcfx at ``interval=1`` (every step
full) must equal the plain pipeline exactly; the same graphs at ``interval=3`` must equal the
reference helper (DeepCacheSDHelper). Eager backend, fp32; Inductor with ``--inductor-matrix``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

import dcfx
from dcfx.models import spec_for
from dcfx.passes import FEATURE_INPUT, PassContext, capture, partition
from tests.fixtures import tiny_sd
from tests.pipelines.builders import (
    IMAGE_EMBED_DIM,
    STEPS,
    _generate,
    _image,
    _seeded,
    load_tiny_ip_adapter,
    make_ip_adapter,
    make_sd,
    make_sdxl,
    make_t2i_adapter,
    run_ip_adapter,
    run_t2i_adapter,
    run_txt2img,
    run_with_helper,
    tiny_image_encoder,
    tiny_t2i_adapter,
)

REBUILT = "changed since its graphs were built"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def with_helper(pipe, run: Callable, branch: int, interval: int = 3) -> torch.Tensor:
    return run_with_helper(pipe, run, branch, interval)


def exact_then_cached(make: Callable, run: Callable, branch: int) -> None:
    """On one pipeline, as a user comparing the two: the plain run, the helper, then dcfx.

    dcfx at interval 1 equals the plain pipeline; the same graphs at 1:3 equal the helper.
    """
    pipe = make()
    plain = run(pipe)
    helper = with_helper(pipe, run, branch)  # its disable() leaves bound forwards on the modules
    dcfx.enable(pipe, branch=branch, interval=1)
    every_step_full = run(pipe)
    assert pipe.unet.stats == {"full": STEPS, "shallow": 0}
    pipe.unet.reschedule(interval=3)
    cached = run(pipe)
    assert pipe.unet.stats == {"full": STEPS + 4, "shallow": 6} and pipe.unet.graph_builds == 1
    torch.testing.assert_close(every_step_full, plain, atol=0, rtol=0)
    torch.testing.assert_close(cached, helper, atol=1e-5, rtol=0)
    assert max_diff(helper, plain) > 1e-3, "caching did not change the output: the test would be vacuous"


def test_sd_pipeline():
    exact_then_cached(make_sd, run_txt2img, branch=0)


@pytest.mark.slow
def test_ip_adapter_pipeline():
    # Branch 0: its shallow graph runs IP attention processors (see the shallow-graph tests below).
    exact_then_cached(make_ip_adapter, run_ip_adapter, branch=0)
    # Not vacuous: the adapter changes the output.
    assert max_diff(run_ip_adapter(make_ip_adapter()), run_txt2img(make_sd())) > 1e-3


@pytest.mark.slow
def test_ip_adapter_scale_change_is_followed(caplog):
    pipe = make_ip_adapter()
    dcfx.enable(pipe, branch=0, interval=1)
    run_ip_adapter(pipe)
    pipe.set_ip_adapter_scale(0.3)
    with caplog.at_level(logging.INFO, logger="dcfx.runtime"):
        got = run_ip_adapter(pipe)
    rebuilt = [r.getMessage() for r in caplog.records if REBUILT in r.getMessage()]
    assert pipe.unet.graph_builds == 2 and len(rebuilt) == 1 and "scale" in rebuilt[0], rebuilt
    pipe.unet.reschedule(interval=3)
    cached = run_ip_adapter(pipe)
    assert pipe.unet.graph_builds == 2

    def make_scaled():
        scaled = make_ip_adapter()
        scaled.set_ip_adapter_scale(0.3)
        return scaled

    plain = run_ip_adapter(make_scaled())
    assert max_diff(plain, run_ip_adapter(make_ip_adapter())) > 1e-3, "the scale did not change the output"
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    torch.testing.assert_close(cached, with_helper(make_scaled(), run_ip_adapter, 0), atol=1e-5, rtol=0)


def make_with_image_encoder():
    pipe = make_sd()
    torch.manual_seed(4)
    pipe.register_modules(image_encoder=tiny_image_encoder(IMAGE_EMBED_DIM))
    return pipe


def run_with_image(pipe) -> torch.Tensor:
    return _generate(pipe, ip_adapter_image=_image(), height=32, width=32)


@pytest.mark.slow
def test_ip_adapter_unloaded_and_reloaded_after_compile():
    # The pipeline encodes ip_adapter_image itself, reading pipe.unet.encoder_hid_proj, which
    # unload_ip_adapter sets to None through pipe.unet: dcfx must pass that on to the U-Net.
    pipe = make_with_image_encoder()
    encoder = pipe.image_encoder
    load_tiny_ip_adapter(pipe)
    dcfx.enable(pipe, branch=0, interval=1)
    first = run_with_image(pipe)
    pipe.unload_ip_adapter()  # drops the image encoder too
    assert pipe.unet.model.encoder_hid_proj is None
    unloaded = run_txt2img(pipe)
    load_tiny_ip_adapter(pipe)
    pipe.register_modules(image_encoder=encoder)
    assert pipe.unet.encoder_hid_proj is pipe.unet.model.encoder_hid_proj is not None
    reloaded = run_with_image(pipe)
    assert pipe.unet.graph_builds == 3

    plain = make_with_image_encoder()
    load_tiny_ip_adapter(plain)
    want = run_with_image(plain)
    without = run_txt2img(make_sd())
    assert max_diff(want, without) > 1e-3, "the adapter did not change the output: the test would be vacuous"
    torch.testing.assert_close(first, want, atol=0, rtol=0)
    torch.testing.assert_close(unloaded, without, atol=0, rtol=0)
    torch.testing.assert_close(reloaded, want, atol=0, rtol=0)


def test_attribute_writes_through_the_runtime_reach_the_model():
    unet = tiny_sd()
    fast = dcfx.compile(unet, branch=0, interval=3)
    projection = torch.nn.Linear(2, 2)
    fast.encoder_hid_proj = projection
    assert unet.encoder_hid_proj is projection
    fast.encoder_hid_proj = None
    assert unet.encoder_hid_proj is None and "encoder_hid_proj" not in vars(fast)
    # The runtime's own attributes, and those of its class (a patched forward), stay its own.
    fast.forward = print
    fast.deepcache_note = 1
    assert vars(fast)["forward"] is print and unet.forward is not print and not hasattr(unet, "deepcache_note")


# 0: the shallow steps read no T2I residual; 8: all three, the last through diffusers'
# in-place add to a skip tensor (see the shallow-graph tests below).
@pytest.mark.slow
@pytest.mark.parametrize("branch", [0, 8])
def test_t2i_adapter_pipeline(branch):
    exact_then_cached(make_t2i_adapter, run_t2i_adapter, branch)
    # Not vacuous: the adapter changes the output.
    pipe = make_t2i_adapter()
    assert max_diff(run_t2i_adapter(pipe), run_t2i_adapter(pipe, scale=0.0)) > 1e-3


def used_inputs(gm: torch.fx.GraphModule) -> set[str]:
    return {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.users} - {FEATURE_INPUT}


def shallow_inputs(unet, call: dict) -> dict[int, set[str]]:
    """Returns, per branch, the graph inputs that the shallow graph reads (one capture)."""
    spec = spec_for(unet)
    (names, tensors), _ = spec.flatten(unet, (), call)
    captured = capture(unet, names, tensors)
    assert used_inputs(captured) == {n.replace(".", "_") for n in names}
    return {
        layer.branch: used_inputs(partition(captured, PassContext(unet, spec, names, layer)).shallow)
        for layer in spec.up_layers(unet)
    }


def unet_call(unet, **extra) -> dict:
    return {
        "sample": _seeded(0, 2, 4, 16, 16),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": _seeded(1, 2, 7, 8),
        **extra,
    }


def t2i_residuals(seed: int = 3) -> list[torch.Tensor]:
    """The T2I-Adapter's features of a 16x16 image: (2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)."""
    with torch.no_grad():
        return tiny_t2i_adapter()(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def test_ip_adapter_shallow_graphs_read_the_image_embeddings():
    # SD 1.x layout: every branch keeps cross-attention layers (the last up block has them), so
    # every shallow graph reads the image embeddings, as it does the text embeddings.
    unet = make_ip_adapter().unet
    call = unet_call(unet, added_cond_kwargs={"image_embeds": [_seeded(2, 2, 1, IMAGE_EMBED_DIM)]})
    for branch, used in shallow_inputs(unet, call).items():
        assert {"encoder_hidden_states", "added_cond_kwargs_image_embeds_0"} <= used, (branch, used)


@pytest.mark.slow
def test_ip_adapter_sdxl_shallow_graphs_of_the_outer_branches_read_no_embeddings():
    # SDXL layout: the outer down and up blocks have no attention, so the shallow graphs of
    # branches 0-2 read neither the text nor the image embeddings; from branch 3 on they read both.
    pipe = make_sdxl()
    load_tiny_ip_adapter(pipe)
    added = {
        "image_embeds": [_seeded(2, 2, 1, IMAGE_EMBED_DIM)],
        "text_embeds": _seeded(4, 2, 8),
        "time_ids": _seeded(5, 2, 6),
    }
    for branch, used in shallow_inputs(pipe.unet, unet_call(pipe.unet, added_cond_kwargs=added)).items():
        embeddings = used & {"encoder_hidden_states", "added_cond_kwargs_image_embeds_0"}
        assert len(embeddings) == (2 if branch >= 3 else 0), (branch, used)


@pytest.mark.slow
def test_t2i_adapter_shallow_graphs_read_the_residuals_of_the_skips_they_consume():
    # SD layout (L = 3): residual k is added to the output of down block k's last layer, the
    # skip that the up layer of branch 3k + 2 consumes (down block 2 adds it in place after the
    # block, to the very tensor it returns as that skip). The shallow graph of branch b reads
    # residual k exactly when b >= 3k + 2; branches 0 and 1 read none.
    unet = tiny_sd()
    call = unet_call(unet, down_intrablock_additional_residuals=t2i_residuals())
    for branch, used in shallow_inputs(unet, call).items():
        residuals = {int(name[-1]) for name in used if name.startswith("down_intrablock")}
        assert residuals == {k for k in range(3) if branch >= 3 * k + 2}, (branch, used)


@pytest.mark.slow
@pytest.mark.parametrize(("adapter", "branch", "read"), [("ip", 0, True), ("t2i", 0, False), ("t2i", 2, True)])
def test_shallow_steps_take_adapter_inputs_fresh(adapter, branch, read):
    """A shallow step's output changes with the adapter inputs it reads, and only with those."""
    if adapter == "ip":
        unet = make_ip_adapter().unet

        def inputs(bump: float) -> dict:
            return {"added_cond_kwargs": {"image_embeds": [_seeded(2, 2, 1, IMAGE_EMBED_DIM) + bump]}}
    else:
        unet = tiny_sd()

        def inputs(bump: float) -> dict:
            return {"down_intrablock_additional_residuals": [r + bump for r in t2i_residuals()]}

    fast = dcfx.compile(unet, branch=branch, interval=2)
    first, second = (unet_call(unet, **inputs(0.0), timestep=torch.tensor(t)) for t in (900, 800))
    full = fast(**first).sample
    same = fast(**second).sample
    fast.reset()
    fast(**first)
    bumped = fast(**{**second, **inputs(0.5)}).sample
    assert fast.stats == {"full": 2, "shallow": 2}
    with torch.no_grad():
        plain = unet(**unet_call(unet, **inputs(0.0), timestep=torch.tensor(900))).sample
    torch.testing.assert_close(full, plain, atol=0, rtol=0)
    if read:
        assert max_diff(bumped, same) > 1e-4
    else:
        torch.testing.assert_close(bumped, same, atol=0, rtol=0)


@pytest.mark.slow
def test_residuals_that_stop_part_way_make_a_full_step():
    # StableDiffusionXLAdapterPipeline with adapter_conditioning_factor < 1 stops passing the
    # residuals part way: that call has other inputs than the cache was made for.
    unet = tiny_sd()
    fast = dcfx.compile(unet, branch=2, interval=5)
    residuals = t2i_residuals()
    calls = [
        unet_call(unet, timestep=torch.tensor(t), down_intrablock_additional_residuals=residuals) for t in (900, 800)
    ]
    calls += [unet_call(unet, timestep=torch.tensor(t)) for t in (700, 600)]
    outs = [fast(**call).sample for call in calls]
    # Steps 0 and 2 full (the second for the new inputs), 1 and 3 shallow; one graph pair per set of inputs.
    assert fast.stats == {"full": 2, "shallow": 2} and fast.graph_builds == 2
    with torch.no_grad():
        plain = unet(**calls[2]).sample
    torch.testing.assert_close(outs[2], plain, atol=0, rtol=0)


PIPELINES = {"ip-adapter": (make_ip_adapter, run_ip_adapter), "t2i-adapter": (make_t2i_adapter, run_t2i_adapter)}


# One Inductor compile per pipeline, minutes each on 2 CPU cores: with --inductor-matrix only.
@pytest.mark.slow
@pytest.mark.inductor_matrix
@pytest.mark.parametrize("case", sorted(PIPELINES))
def test_adapter_pipeline_under_inductor(case):
    make, run = PIPELINES[case]
    pipe = make()
    dcfx.enable(pipe, branch=0, interval=3, backend="inductor")
    got = run(pipe)
    eager = make()
    dcfx.enable(eager, branch=0, interval=3)
    want = run(eager)
    # Inductor's kernels round differently (~1e-6 per call), amplified by guidance over ten
    # steps (see test_pipelines.test_pipeline_under_inductor).
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=1e-3 * scale, rtol=0)
    assert pipe.unet.stats == {"full": 4, "shallow": 6}
