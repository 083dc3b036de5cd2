"""The graphs follow the model: every way users change a U-Net after compiling it, in a real pipeline.

Each workflow sets the model up, runs one generation through dcfx (graphs built), changes the
model, and generates again. At ``interval=1`` every step is full, so dcfx must equal the plain
pipeline with the change; then ``reschedule(interval=3)`` (the same graphs) must equal the
reference helper (DeepCacheSDHelper, which patches module forwards and so follows every change)
on a fresh pipeline with the same set-up and change. Eager: exactly. Inductor (one workflow
in CI; all with ``--inductor-matrix``): within its tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from peft import LoraConfig

import dcfx
from tests.fixtures import make_sd_pipeline, run_sd
from tests.pipelines.builders import run_with_helper

STEPS = 6
Step = Callable[[object], None]


def add_lora(name: str, seed: int) -> Step:
    def add(pipe) -> None:
        torch.manual_seed(seed)  # init_lora_weights=False draws random A and B: the same ones in every pipeline
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
        pipe.unet.add_adapter(config, adapter_name=name)

    return add


def other_weights(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pipe.unet.state_dict().items()}


def chain(*steps: Step) -> Step:
    def run(pipe) -> None:
        for step in steps:
            step(pipe)

    return run


def nothing(pipe) -> None:
    pass


FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}


class DampedAttention(AttnProcessor):
    """A user's own attention processor: plain attention, its output scaled down."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)


# name: (set-up before the first generation, the change after it)
WORKFLOWS: dict[str, tuple[Step, Step]] = {
    "lora-added": (nothing, add_lora("a", 0)),
    "lora-weights-set": (add_lora("a", 0), lambda p: p.unet.set_adapters(["a"], weights=[0.3])),
    "lora-two-mixed": (
        chain(add_lora("a", 0), add_lora("b", 1), lambda p: p.unet.set_adapters(["a"])),
        lambda p: p.unet.set_adapters(["a", "b"], weights=[0.5, 0.7]),
    ),
    "lora-disabled": (add_lora("a", 0), lambda p: p.unet.disable_adapters()),
    "lora-re-enabled": (
        chain(add_lora("a", 0), lambda p: p.unet.disable_adapters()),
        lambda p: p.unet.enable_adapters(),
    ),
    "lora-fused": (add_lora("a", 0), lambda p: p.unet.fuse_lora(lora_scale=0.8)),
    "lora-unfused": (
        chain(add_lora("a", 0), lambda p: p.unet.fuse_lora(lora_scale=0.8)),
        lambda p: p.unet.unfuse_lora(),
    ),
    "lora-deleted": (add_lora("a", 0), lambda p: p.unet.delete_adapters("a")),
    "freeu-on": (nothing, lambda p: p.enable_freeu(**FREEU)),
    "freeu-changed": (lambda p: p.enable_freeu(**FREEU), lambda p: p.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)),
    "freeu-off": (lambda p: p.enable_freeu(**FREEU), lambda p: p.disable_freeu()),
    "attention-processor-swapped": (nothing, lambda p: p.unet.set_attn_processor(DampedAttention())),
    "fuse-qkv-projections": (nothing, lambda p: p.fuse_qkv_projections()),
    "load-state-dict-in-place": (nothing, lambda p: p.unet.load_state_dict(other_weights(p))),
    "load-state-dict-assign": (nothing, lambda p: p.unet.load_state_dict(other_weights(p), assign=True)),
    "to-dtype": (nothing, lambda p: p.to(torch.float64)),
}
# Changes the eager graphs follow without a rebuild: weights written in place into the storage
# they read.
NO_REBUILD_EAGER = {"load-state-dict-in-place"}
# Changes that compute the same image another way (fused projections; a fused adapter unfused
# keeps its scale): the graphs are rebuilt all the same, and must still be exact.
SAME_IMAGE = {"fuse-qkv-projections", "lora-unfused"}


def run(pipe) -> torch.Tensor:
    return run_sd(pipe, steps=STEPS)


def with_helper(setup: Step, change: Step, interval: int) -> torch.Tensor:
    pipe = make_sd_pipeline()
    setup(pipe)
    change(pipe)
    return run_with_helper(pipe, run, 0, interval)


def follow(workflow: str, backend: str, caplog) -> None:
    setup, change = WORKFLOWS[workflow]
    pipe = make_sd_pipeline()
    setup(pipe)
    dcfx.enable(pipe, branch=0, interval=1, backend=backend)
    before = run(pipe)
    change(pipe)
    with caplog.at_level(logging.INFO, logger="dcfx.runtime"):
        got = run(pipe)
        again = run(pipe)  # nothing changed since: no rebuild
    runtime = pipe.unet
    rebuilt = [r.getMessage() for r in caplog.records if "changed since its graphs were built" in r.getMessage()]
    if backend == "eager" and workflow in NO_REBUILD_EAGER:
        assert runtime.graph_builds == 1 and not rebuilt
    else:
        assert runtime.graph_builds == 2 and len(rebuilt) == 1, rebuilt
    runtime.reschedule(interval=3)
    cached = run(pipe)
    assert runtime.graph_builds == (1 if backend == "eager" and workflow in NO_REBUILD_EAGER else 2)
    dcfx.disable(pipe)
    plain = run(pipe)

    if workflow not in SAME_IMAGE:
        assert (plain - before).abs().max() > 1e-3, "the change did not change the image: the test would be vacuous"
    helper = with_helper(setup, change, interval=3)
    assert (helper - plain).abs().max() > 1e-4, "caching did not change the image: the test would be vacuous"
    if backend == "eager":
        torch.testing.assert_close(got, plain, atol=0, rtol=0)
        torch.testing.assert_close(again, plain, atol=0, rtol=0)
        torch.testing.assert_close(cached, helper, atol=1e-5, rtol=0)
    else:
        # Inductor's kernels round differently (~1e-6 per call; see test_pipelines).
        scale = max(1.0, float(plain.abs().max()))
        torch.testing.assert_close(got, plain, atol=1e-3 * scale, rtol=0)
        torch.testing.assert_close(again, got, atol=0, rtol=0)
        torch.testing.assert_close(cached, helper, atol=1e-3 * scale, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("workflow", sorted(WORKFLOWS))
def test_eager_graphs_follow_the_model(workflow, caplog):
    follow(workflow, "eager", caplog)


# One Inductor compile per graph build, 3-4 minutes each for a tiny pipeline on 2 CPU cores:
# every workflow runs with --inductor-matrix. CI runs the hazard that is Inductor's own (a
# weight written in place under freezing) in tests/pipelines/test_pipelines.py.
@pytest.mark.slow
@pytest.mark.inductor_matrix
@pytest.mark.parametrize("workflow", sorted(WORKFLOWS))
def test_inductor_graphs_follow_the_model(workflow, caplog):
    follow(workflow, "inductor", caplog)
