"""A transformer changed after a first generation: dcfx follows, as it does for U-Nets.

On one pipeline, in the order a user works: dcfx on, a generation, then a change (a peft LoRA
adapter, its weights, a per-call LoRA scale, another attention processor, weights loaded in
place), a generation after each. With ``interval=1`` every step is full, so each result must
equal the plain pipeline's with the same change, exactly. Then caching (interval 3) and two
threads generating at once on the same runtime.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import dcfx
from tests.transformers.tiny import BUILDERS, Tiny

peft = pytest.importorskip("peft")

STEPS = 4


def plain(tiny, **kwargs) -> torch.Tensor:
    """The plain pipeline's latents (dcfx off for the call, then on again with the same settings)."""
    runtime = tiny.pipe.transformer
    dcfx.disable(tiny.pipe)
    try:
        return tiny.generate(STEPS, **kwargs)
    finally:
        tiny.pipe.transformer = runtime


@pytest.mark.parametrize("name", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_changes_after_a_first_generation_are_followed(name):
    tiny = BUILDERS[name]()
    tiny.pipe.set_progress_bar_config(disable=True)
    dcfx.enable(tiny.pipe, interval=1, first=1, last=1)
    runtime = tiny.pipe.transformer
    model = runtime.model
    assert torch.equal(tiny.generate(STEPS), plain(tiny))

    # A LoRA adapter added through peft, then its weights changed, then a per-call scale.
    config = peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    model.add_adapter(config, adapter_name="a")
    before = plain(tiny)
    assert torch.equal(tiny.generate(STEPS), before)
    model.set_adapters(["a"], weights=[0.3])
    assert torch.equal(tiny.generate(STEPS), plain(tiny))
    scaled = {}
    for scale in (0.5, 0.2, 0.7):
        kwargs = {"joint_attention_kwargs": {"scale": scale}}
        scaled[scale] = tiny.generate(STEPS, **kwargs)
        assert torch.equal(scaled[scale], plain(tiny, **kwargs))
        if scale == 0.5:
            builds = runtime.graph_builds  # calls with a scale take one more input: one more pair
    assert runtime.graph_builds == builds  # the scale is a graph input: no rebuild per scale
    assert not torch.equal(scaled[0.5], scaled[0.2])
    model.disable_adapters()
    assert torch.equal(tiny.generate(STEPS), plain(tiny))

    # Another attention processor on every attention layer.
    processor = type(next(iter(model.attn_processors.values())))

    class Halved(processor):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

    model.set_attn_processor(Halved())
    changed = plain(tiny)
    assert torch.equal(tiny.generate(STEPS), changed)

    # Weights written in place.
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    reloaded = plain(tiny)
    assert not torch.equal(reloaded, changed)
    assert torch.equal(tiny.generate(STEPS), reloaded)


def test_two_threads_generate_at_once_on_one_runtime():
    tiny = BUILDERS["sd3"]()
    tiny.pipe.set_progress_bar_config(disable=True)
    dcfx.enable(tiny.pipe, interval=3, first=1, last=1)
    runtime = tiny.pipe.transformer
    alone = {seed: tiny.generate(7, seed=seed) for seed in (0, 1)}
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(seed: int) -> None:
        # A pipeline per thread (a scheduler is per generation), the transformer runtime shared.
        own = Tiny(
            tiny.name,
            type(tiny.pipe)(**{**tiny.pipe.components, "scheduler": copy.deepcopy(tiny.pipe.scheduler)}),
            tiny.call,
        )
        own.pipe.set_progress_bar_config(disable=True)
        try:
            start.wait()
            for _ in range(3):
                with runtime.generation(scheduler=own.pipe.scheduler):
                    results[seed].append(own.generate(7, seed=seed))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for seed, outs in results.items():
        assert len(outs) == 3
        for out in outs:
            # Each thread has its own generation: its steps and cache are its own.
            torch.testing.assert_close(out, alone[seed], rtol=0, atol=1e-5 * float(alone[seed].abs().max()))


def test_after_diffusers_first_block_cache_refused_then_exact_once_removed():
    from diffusers import FirstBlockCacheConfig

    tiny = BUILDERS["flux"]()
    tiny.pipe.set_progress_bar_config(disable=True)
    tiny.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match=r"keeps state across calls.*model\.disable_cache"):
        dcfx.compile(tiny.transformer, first=1, last=1)
    tiny.transformer.disable_cache()
    want = tiny.generate(STEPS)
    dcfx.enable(tiny.pipe, first=1, last=1, interval=1)
    assert torch.equal(tiny.generate(STEPS), want)
