"""dcfx's block-range cut equals cache-dit's DBCache (1.5.3) with the same F, B and step mask.

cache-dit with ``DBCacheConfig(Fn_compute_blocks=F, Bn_compute_blocks=B,
steps_computation_mask=M, steps_computation_policy="static")`` runs the first F and the last B
blocks on every step and, where ``M[i] == 0``, adds the residual the middle blocks added at the
last full step (per stream; Flux's double and single blocks chained as one list). dcfx with
``first=F, last=B`` and the schedule whose full steps are the ones of M must give the same
latents: fp32, eager, within 1e-5 of the output's scale.

As a user would: on one pipeline, cache-dit first (enabled, generations, disabled: it leaves
a patched forward behind on Flux), then dcfx on the same objects, generations back to back.
The fast tier checks one cut on every model; the other cuts and schedules are in the slow tier.
"""

from __future__ import annotations

import os

import pytest
import torch

import dcfx
from dcfx.schedule import full_step_indices
from tests.transformers.tiny import BUILDERS, MODELS

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
cache_dit = pytest.importorskip("cache_dit")

STEPS = 8
# (first, last, dcfx schedule fields): uniform 1:3, uniform 1:2, and a non-uniform mask. The
# first runs in the fast tier on every model, the others in the slow tier.
CASES = (
    pytest.param(1, 1, {"interval": 3}, id="F1B1-uniform"),
    pytest.param(2, 0, {"interval": 2}, id="F2B0-uniform", marks=pytest.mark.slow),
    pytest.param(
        1, 2, {"schedule": "explicit", "full_steps": (0, 1, 4, 6)}, id="F1B2-explicit", marks=pytest.mark.slow
    ),
)


def mask_of(fields: dict) -> list[int]:
    """The cache-dit step mask of a dcfx schedule: 1 on its full steps."""
    full = full_step_indices(dcfx.DeepCacheConfig(first=1, **fields), STEPS)
    return [int(i in full) for i in range(STEPS)]


def cache_dit_latents(tiny, first: int, last: int, mask: list[int], seeds: tuple[int, ...]) -> list[torch.Tensor]:
    config = tiny.cache_dit_config(first, last, mask)
    cache_dit.enable_cache(tiny.pipe, cache_config=config)
    try:
        return [tiny.generate(STEPS, seed=seed) for seed in seeds]
    finally:
        cache_dit.disable_cache(tiny.pipe)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    t = BUILDERS[request.param]()
    t.pipe.set_progress_bar_config(disable=True)
    return t


def test_schedules_become_the_masks_cache_dit_takes():
    assert mask_of({"interval": 3}) == [1, 0, 0, 1, 0, 0, 1, 0]
    assert mask_of({"schedule": "explicit", "full_steps": (0, 1, 4, 6)}) == [1, 1, 0, 0, 1, 0, 1, 0]


@pytest.mark.parametrize(("first", "last", "fields"), CASES)
def test_equals_cache_dit_after_cache_dit_was_on_the_same_pipeline(tiny, first, last, fields):
    seeds = (0, 5)
    expected = cache_dit_latents(tiny, first, last, mask_of(fields), seeds)
    plain = tiny.generate(STEPS, seed=0)
    dcfx.enable(tiny.pipe, first=first, last=last, **fields)
    try:
        for _ in range(2):  # generations back to back, twice over
            for seed, want in zip(seeds, expected, strict=True):
                got = tiny.generate(STEPS, seed=seed)
                assert close(got, want) <= 1e-5, (tiny.name, first, last, fields, seed)
        full = sum(mask_of(fields))
        calls = 4 * tiny.calls_per_step  # 4 generations
        assert tiny.pipe.transformer.stats == {"full": calls * full, "shallow": calls * (STEPS - full)}
    finally:
        dcfx.disable(tiny.pipe)
    # Caching changed the result (the comparison above is not of two plain runs).
    assert close(expected[0], plain) > 1e-4


@pytest.mark.slow  # guidance on, the pipelines' default, is checked fast above
@pytest.mark.parametrize("name", [name for name in MODELS if name != "flux"])
def test_equals_cache_dit_without_guidance(name):
    # Flux is guidance-distilled: its guidance is an input, never a second batch.
    tiny = BUILDERS[name]()
    tiny.pipe.set_progress_bar_config(disable=True)
    tiny.call = dict(tiny.call, guidance_scale=1.0)
    (want,) = cache_dit_latents(tiny, 1, 1, mask_of({"interval": 3}), (2,))
    dcfx.enable(tiny.pipe, first=1, last=1, interval=3)
    try:
        got = tiny.generate(STEPS, seed=2)
    finally:
        dcfx.disable(tiny.pipe)
    assert close(got, want) <= 1e-5
