"""The Inductor backend on a latent-diffusion UNetModel (one tiny compile; slow)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

import dcfx
from tests.fixtures import tiny_ldm_text

pytestmark = pytest.mark.slow  # two Inductor compiles of a one-level model


def test_inductor_equals_eager_per_call_and_never_recompiles():
    # One level: a transformer block in the input, middle and output blocks, whose attention
    # runs inside ldm's autocast(enabled=False) region (a higher-order op in the graph).
    unet = tiny_ldm_text(num_res_blocks=1, channel_mult=(1,))
    compiled = dcfx.compile(unet, branch=0, interval=3, backend="inductor")
    eager = dcfx.compile(unet, branch=0, interval=3)
    g = torch.Generator().manual_seed(4)
    context = torch.randn(2, 7, 24, generator=g)
    # A new x every step, as a sampler's: a shallow step's cached feature is from another x.
    steps = [(torch.randn(2, 4, 16, 16, generator=g), torch.full((2,), t)) for t in (901, 801, 701, 601, 501, 401)]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # two generations, one compile per graph
            for x, t in steps:
                got, want = compiled(x, t, context=context), eager(x, t, context=context)
                assert type(got) is torch.Tensor
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert compiled.stats == eager.stats == {"full": 4, "shallow": 8}
    # The last step was shallow: its output differs from the model's own by far more than that.
    with torch.no_grad():
        assert (unet(x, t, context=context) - got).abs().max() > 1e-2
