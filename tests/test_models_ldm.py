"""The latent-diffusion UNetModel layout: dcfx equals a hand-written DeepCache loop over its modules.

The reference helper (DeepCacheSDHelper) knows diffusers U-Nets only, so the reference here is
DeepCache written out by hand over the model's own modules (``deepcache_call``), driven by a
plain DDIM loop as LDM's sampler runs it: one U-Net call per step, ``timesteps`` of shape
(batch,), classifier-free guidance as a doubled batch. fp32, eager backend. Every case also
checks that caching changed the output, so the equality is not vacuous.
"""

from __future__ import annotations

import types
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

import dcfx
from dcfx import schedule
from dcfx.models import spec_for
from dcfx.models.ldm import LdmSpec, is_ldm_unet
from tests.fixtures import tiny_ldm_class, tiny_ldm_text

STEPS = 10
GUIDANCE = 7.5
# LDM's scaled-linear betas and its uniform DDIM timesteps (901, 801, ..., 1).
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
TIMESTEPS = list(range(1, 1000, 1000 // STEPS))[::-1]


def deepcache_call(model, x, timesteps, branch, cached, context=None, y=None):
    """DeepCache by hand: returns (output, the feature ``output_blocks[n - 1 - branch]`` takes).

    A full call (``cached`` None) runs ``UNetModel.forward`` step by step and keeps the hidden
    state entering that output block; a shallow call runs the input blocks whose skips the
    blocks from there on take, then those blocks on the cached hidden state.
    """
    emb = model.time_embed(timestep_embedding(timesteps, model.model_channels, repeat_only=False))
    if y is not None:
        emb = emb + model.label_emb(y)
    cut = len(model.output_blocks) - 1 - branch
    hs, h = [], x.type(model.dtype)
    for i, block in enumerate(model.input_blocks):
        if cached is not None and i > branch:
            break
        h = block(h, emb, context)
        hs.append(h)
    feature = cached
    if cached is None:
        h = model.middle_block(h, emb, context)
    for j, block in enumerate(model.output_blocks):
        if j < cut and cached is not None:
            continue
        if j == cut:
            feature = h if cached is None else feature
            h = feature
        h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
    return model.out(h.type(x.dtype)), feature


def hand_written(model, branch: int, full_steps: set[int]):
    """Returns a U-Net call ``(step, x, t, **cond) -> eps`` running DeepCache by hand."""
    cache = {}

    def call(step, x, t, **cond):
        out, cache["feature"] = deepcache_call(
            model, x, t, branch, None if step in full_steps else cache["feature"], **cond
        )
        return out

    return call


def ddim(unet_call, x, cond: dict, guided: bool) -> torch.Tensor:
    """Returns the DDIM (eta 0) sample from noise ``x``; ``unet_call(step, x, t, **cond)``."""
    for step, t in enumerate(TIMESTEPS):
        a_t = ALPHAS[t].float()
        a_prev = ALPHAS[TIMESTEPS[step + 1]].float() if step + 1 < STEPS else ALPHAS[0].float()
        if guided:  # (unconditional, conditional) as one doubled batch
            x_in = torch.cat([x, x])
            eps_u, eps_c = unet_call(step, x_in, torch.full((len(x_in),), t), **cond).chunk(2)
            eps = eps_u + GUIDANCE * (eps_c - eps_u)
        else:
            eps = unet_call(step, x, torch.full((len(x),), t), **cond)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def text_case():
    g = torch.Generator().manual_seed(1)
    uncond, cond = torch.randn(1, 7, 24, generator=g), torch.randn(1, 7, 24, generator=g)
    return torch.randn(1, 4, 16, 16, generator=g), {"context": torch.cat([uncond, cond])}, True


def class_case():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 16, 16, generator=g), {"y": torch.tensor([3, 7])}, False


MODELS = {"text": (tiny_ldm_text, text_case), "class": (tiny_ldm_class, class_case)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_hand_written_reference_is_the_model_when_nothing_is_stale(name):
    # Full: the model's own forward. Shallow on the feature of the same input: the same output.
    make, case = MODELS[name]
    model = make()
    x, cond, guided = case()
    x = torch.cat([x, x]) if guided else x
    t = torch.full((len(x),), 501)
    with torch.no_grad():
        want = model(x, t, **cond)
        for branch in range(len(model.output_blocks)):
            full, feature = deepcache_call(model, x, t, branch, None, **cond)
            shallow, _ = deepcache_call(model, x, t, branch, feature, **cond)
            torch.testing.assert_close(full, want, atol=0, rtol=0)
            torch.testing.assert_close(shallow, want, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def plain() -> dict[str, torch.Tensor]:
    """Each model's DDIM sample without caching."""
    out = {}
    for name, (make, case) in MODELS.items():
        model = make()
        x, cond, guided = case()
        with torch.no_grad():
            out[name] = ddim(lambda step, x, t, **c: model(x, t, **c), x, cond, guided)  # noqa: B023
    return out


# Branches in both levels (0-2 in the last, 3-5 in the deeper one), every interval 2-5.
CASES = [("text", 0, 3), ("text", 2, 2), ("text", 4, 5), ("class", 1, 4), ("class", 3, 2), ("class", 5, 3)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "branch", "interval"), CASES)
def test_sampling_run_equals_hand_written_deepcache(plain, name, branch, interval):
    make, case = MODELS[name]
    model = make()
    x, cond, guided = case()
    full = {i for i in range(STEPS) if i % interval == 0}
    with torch.no_grad():
        want = ddim(hand_written(model, branch, full), x, cond, guided)
        runtime = dcfx.compile(model, branch=branch, interval=interval)
        got = ddim(lambda step, x, t, **c: runtime(x, t, **c), x, cond, guided)
        # A second generation on the same runtime starts cleanly: it gives the same sample.
        again = ddim(lambda step, x, t, **c: runtime(x, t, **c), x, cond, guided)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    assert runtime.stats == {"full": 2 * len(full), "shallow": 2 * (STEPS - len(full))}
    assert (got - plain[name]).abs().max() > 1e-4, "caching did not change the output"


def test_non_uniform_schedule_with_a_sampler_timestep_list(plain):
    # LDM's samplers have no diffusers scheduler; any object with .timesteps tells the runtime
    # each generation's steps (here needed by the non-uniform schedule).
    model = tiny_ldm_text()
    x, cond, guided = text_case()
    cfg = dcfx.DeepCacheConfig(branch=1, interval=3, schedule="non-uniform", center=4, power=1.4)
    full = set(schedule.full_step_indices(cfg, STEPS))
    assert len(full) < STEPS
    sampler = SimpleNamespace(timesteps=torch.tensor(TIMESTEPS))
    with torch.no_grad():
        want = ddim(hand_written(model, 1, full), x, cond, guided)
        runtime = dcfx.compile(model, cfg, scheduler=sampler)
        got = ddim(lambda step, x, t, **c: runtime(x, t, **c), x, cond, guided)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert runtime.stats == {"full": len(full), "shallow": STEPS - len(full)}
    assert (got - plain["text"]).abs().max() > 1e-4


def test_the_runtime_is_a_drop_in_returning_a_tensor():
    model = tiny_ldm_class()
    runtime = dcfx.compile(model, branch=0, interval=1)  # every step full: the model's own output
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        out = runtime(x, torch.tensor([500, 500]), y=y)
        want = model(x, torch.tensor([500, 500]), y=y)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert runtime.num_classes == 10 and runtime.model_channels == 32  # the model's attributes


def test_forwards_left_on_the_instances_are_captured_as_the_model_runs():
    # What DeepCacheSDHelper-like wrappers leave behind: bound forwards on every module.
    model = tiny_ldm_class()
    for m in model.modules():
        m.forward = types.MethodType(type(m).forward, m)
    x, y, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([500, 500])
    with torch.no_grad():
        want = model(x, t, y=y)
    runtime = dcfx.compile(model, branch=1, interval=2, scheduler=SimpleNamespace(timesteps=torch.tensor([500, 500])))
    torch.testing.assert_close(runtime(x, t, y=y), want, atol=0, rtol=0)  # full
    torch.testing.assert_close(runtime(x, t, y=y), want, atol=1e-6, rtol=0)  # shallow, on its cache
    assert runtime.stats == {"full": 1, "shallow": 1}


def test_chosen_by_structure_not_by_class():
    unet = tiny_ldm_text()

    class Derived(UNetModel):
        pass

    class Forked(torch.nn.Module):  # a copy of the class elsewhere: same layout, no common base
        forward = UNetModel.forward

        def __init__(self, original):
            super().__init__()
            self.__dict__.update(original.__dict__)

    derived = Derived.__new__(Derived)
    derived.__dict__.update(unet.__dict__)
    forked = Forked(unet)
    for model in (unet, derived, forked):
        assert is_ldm_unet(model) and isinstance(spec_for(model), LdmSpec)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([300, 300]), torch.randn(2, 7, 24)
    with torch.no_grad():
        want = unet(x, t, context=c)
        got = dcfx.compile(forked, branch=2, interval=2)(x, t, context=c)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_lookalike_with_another_forward_is_refused():
    class Lookalike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_blocks = torch.nn.ModuleList([torch.nn.Identity()])
            self.middle_block = torch.nn.Identity()
            self.output_blocks = torch.nn.ModuleList([torch.nn.Identity()])

        def forward(self, sample, timestep):
            return sample

    assert not is_ldm_unet(Lookalike())
    with pytest.raises(TypeError, match=r"Lookalike.*latent-diffusion UNetModel.*forward\(x, timesteps"):
        dcfx.compile(Lookalike())


def test_branches_number_the_output_blocks_from_the_output_end():
    unet = tiny_ldm_text()
    layers = spec_for(unet).up_layers(unet)
    # Two levels of three output blocks; branch b is output block 5 - b.
    assert [(u.branch, u.block, u.layer, u.path) for u in layers] == [
        (0, 1, 2, "output_blocks.5"),
        (1, 1, 1, "output_blocks.4"),
        (2, 1, 0, "output_blocks.3"),
        (3, 0, 2, "output_blocks.2"),
        (4, 0, 1, "output_blocks.1"),
        (5, 0, 0, "output_blocks.0"),
    ]
    infos = dcfx.branches(unet)  # default: batch 2 at image_size 16
    assert [b.cache_shape for b in infos] == [(2, 32, 16, 16)] * 2 + [(2, 64, 16, 16)] + [(2, 64, 8, 8)] * 3
    assert infos[0].kept_layers == ["time_embed", "input_blocks.0", "output_blocks.5", "out"]
    assert infos[2].kept_layers[-4:] == ["output_blocks.3", "output_blocks.4", "output_blocks.5", "out"]
    shares = [b.flop_share for b in infos]
    assert shares == sorted(shares) and 0 < shares[0] < 0.2 and shares[-1] < 1
    with pytest.raises(ValueError, match=r"sample shape must be \(batch, 4, height, width\)"):
        dcfx.branches(unet, (2, 3, 16, 16))


def test_resampling_res_blocks_and_checkpointing_are_cut_alike():
    # ADM options (ResBlocks that down/upsample) set the levels; use_checkpoint (SD 1.x's
    # reference config) runs blocks through an autograd Function, traced like the plain call.
    unet = tiny_ldm_class()
    assert spec_for(unet).downsampling_factor(unet) == 2
    assert [u.block for u in spec_for(unet).up_layers(unet)] == [1, 1, 1, 0, 0, 0]
    checkpointed = tiny_ldm_text(use_checkpoint=True)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([300, 300]), torch.randn(2, 7, 24)
    # Two calls at one timestep: the second is a shallow step on the same input, so the cached
    # feature is exactly the one its full graph would compute.
    sampler = SimpleNamespace(timesteps=torch.tensor([300, 300]))
    runtime = dcfx.compile(checkpointed, branch=3, interval=2, scheduler=sampler)
    with torch.no_grad():
        want = checkpointed(x, t, context=c)
        full, shallow = runtime(x, t, context=c), runtime(x, t, context=c)
    assert runtime.stats == {"full": 1, "shallow": 1}
    torch.testing.assert_close(full, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(shallow, want, atol=1e-6, rtol=0)


def test_bad_calls_name_what_the_model_takes():
    text, klass = tiny_ldm_text(), tiny_ldm_class()
    run_text, run_class = dcfx.compile(text, branch=0), dcfx.compile(klass, branch=0)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([300, 300]), torch.randn(2, 7, 24)
    with pytest.raises(TypeError, match=r"UNetModel\.forward: missing a required argument: .timesteps."):
        run_text(x, context=c)
    with pytest.raises(TypeError, match="unexpected keyword argument 'cond'"):
        run_text(x, t, context=c, cond=c)
    with pytest.raises(ValueError, match=r"has cross-attention: pass context of shape \(batch, tokens, 24\)"):
        run_text(x, t)
    with pytest.raises(ValueError, match=r"context must have shape \(batch, tokens, 24\), got \(2, 7, 8\)"):
        run_text(x, t, context=torch.randn(2, 7, 8))
    with pytest.raises(ValueError, match="y was given, but UNetModel is not class-conditional"):
        run_text(x, t, context=c, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"is class-conditional \(label_emb\): pass y"):
        run_class(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor \(torch\.float32 .*\), got torch\.int64"):
        run_class(torch.zeros(2, 3, 16, 16, dtype=torch.long), t, y=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"x has dtype torch\.float16, the U-Net's weights torch\.float32"):
        run_class(torch.randn(2, 3, 16, 16).half(), t, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"y has batch size 3 .* the x 2"):
        run_class(torch.randn(2, 3, 16, 16), t, y=torch.tensor([1, 2, 3]))
    assert run_text.stats == run_class.stats == {"full": 0, "shallow": 0}
