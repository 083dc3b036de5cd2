"""Numerics and structure of the cut on tiny diffusers U-Nets of every supported layout."""

import pytest
import torch

from dcfx.models import spec_for
from dcfx.passes import PassContext, capture, partition
from dcfx.passes.cuts import in_module
from dcfx.passes.verify import deep_modules
from tests.fixtures import UNET_FACTORIES, example_call


@pytest.fixture(scope="module", params=sorted(UNET_FACTORIES))
def captured(request):
    unet = UNET_FACTORIES[request.param]()
    spec = spec_for(unet)
    call = example_call(unet)
    (names, tensors), _ = spec.flatten(unet, (), call)
    return unet, spec, names, tensors, capture(unet, names, tensors), unet(**call).sample


@pytest.mark.slow
def test_every_branch_cuts_exactly(captured):
    unet, spec, names, tensors, gm, reference = captured
    for layer in spec.up_layers(unet):
        ctx = PassContext(model=unet, spec=spec, input_names=names, layer=layer)
        pair = partition(gm, ctx)
        with torch.no_grad():
            sample, feature = pair.full(*tensors)
            shallow = pair.shallow(*tensors, feature)
        torch.testing.assert_close(sample, reference, atol=0, rtol=0)
        torch.testing.assert_close(shallow, sample, atol=0, rtol=0)
        deep = deep_modules(ctx)
        assert not [n for n in pair.shallow.graph.nodes for p in deep if in_module(n, p, ctx.module_prefix)]
        assert len(pair.shallow.graph.nodes) < len(pair.full.graph.nodes)


def test_shallow_graph_of_branch_0_drops_mid_and_down_blocks(captured):
    unet, spec, names, _, gm, _ = captured
    ctx = PassContext(model=unet, spec=spec, input_names=names, layer=spec.up_layers(unet)[0])
    kept = partition(gm, ctx).kept_layers
    assert "conv_in" in kept and "conv_out" in kept
    assert not [k for k in kept if k.startswith(("down_blocks", "mid_block"))]
    last = len(unet.up_blocks) - 1
    assert next(k for k in kept if k.startswith("up_blocks")).startswith(f"up_blocks.{last}.resnets.")


def test_parameters_are_shared_with_the_model(captured):
    unet, spec, names, _, gm, _ = captured
    ctx = PassContext(model=unet, spec=spec, input_names=names, layer=spec.up_layers(unet)[1])
    pair = partition(gm, ctx)
    model_ptrs = {p.data_ptr() for p in unet.parameters()}
    for graph in (pair.full, pair.shallow):
        assert {p.data_ptr() for p in graph.parameters()} <= model_ptrs
    assert sum(p.numel() for p in pair.full.parameters()) == sum(p.numel() for p in unet.parameters())
