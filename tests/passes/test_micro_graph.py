"""Structure of every pass on a hand-built micro U-Net, where each node is known."""

import pytest
import torch

from dcfx.passes import FEATURE_INPUT, partition
from dcfx.passes.cuts import in_module, module_path
from dcfx.passes.locate import find_cache_feature
from dcfx.passes.verify import deep_modules, kept_layers
from tests.passes.micro import micro_context


def test_capture_is_flat_positional_and_exact():
    model, _, inputs, gm = micro_context(0)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["sample", "timestep"]
    (out,) = gm.graph.output_node().args
    assert isinstance(out, torch.fx.Node)
    torch.testing.assert_close(gm(*inputs), model(*inputs)[0], atol=0, rtol=0)


def test_module_paths_name_every_layer():
    _, ctx, _, gm = micro_context(0)
    paths = {module_path(n, ctx.module_prefix) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"conv_in", "mid_block", "up_blocks.1.resnets.1", "down_blocks.0.downsamplers.0"} <= {
        ".".join(p.split(".")[:4]) for p in paths
    }


@pytest.mark.parametrize(
    ("branch", "consumer"),
    [
        (0, "up_blocks.1.resnets.1"),
        (1, "up_blocks.1.resnets.0"),
        (2, "up_blocks.0.resnets.1"),
        (3, "up_blocks.0.resnets.0"),
    ],
)
def test_feature_is_the_main_path_operand_of_the_layer_cat(branch, consumer):
    _, ctx, _, gm = micro_context(branch)
    find_cache_feature(gm, ctx)
    feature = ctx.feature
    cats = [u for u in feature.users if u.target is torch.ops.aten.cat.default]
    assert len(cats) == 1 and cats[0].args[0][0] is feature
    assert all(in_module(u, consumer, ctx.module_prefix) for u in cats[0].users)


def test_shallow_graph_of_branch_0_keeps_only_the_shallow_layers():
    _, ctx, _, gm = micro_context(0)
    pair = partition(gm, ctx)
    kept = set(pair.kept_layers)
    assert kept == {"time", "conv_in", "up_blocks.1.resnets.1", "conv_out"}
    placeholders = [n.name for n in pair.shallow.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["sample", "timestep", FEATURE_INPUT]
    for node in pair.shallow.graph.nodes:
        for path in deep_modules(ctx):
            assert not in_module(node, path, ctx.module_prefix), node


def test_kept_layers_are_the_models_modules_only():
    # torch.export's shape checks over ranges (inserted after tracing) carry this stand-in
    # module stack (torch 2.13): it names no module, so no layer.
    model, ctx, _, gm = micro_context(0)
    shallow = partition(gm, ctx).shallow
    stand_in = "_empty_nn_module_stack_from_metadata_hook"
    placeholder = next(iter(shallow.graph.find_nodes(op="placeholder")))
    with shallow.graph.inserting_after(placeholder):
        check = shallow.graph.call_function(torch.ops.aten.sym_size.int, (placeholder, 0))
    check.meta["nn_module_stack"] = {stand_in: (stand_in, stand_in)}
    assert kept_layers(shallow, model, ctx.module_prefix) == ["time", "conv_in", "up_blocks.1.resnets.1", "conv_out"]


def test_full_graph_returns_sample_and_feature():
    model, ctx, inputs, gm = micro_context(2)
    pair = partition(gm, ctx)
    sample, feature = pair.full(*inputs)
    torch.testing.assert_close(sample, model(*inputs)[0], atol=0, rtol=0)
    assert tuple(feature.shape) == pair.feature_shape == (2, 8, 4, 4)


@pytest.mark.parametrize("branch", range(4))
def test_shallow_on_the_full_feature_equals_full(branch):
    _, ctx, inputs, gm = micro_context(branch)
    pair = partition(gm, ctx)
    sample, feature = pair.full(*inputs)
    torch.testing.assert_close(pair.shallow(*inputs, feature), sample, atol=0, rtol=0)


def test_weights_are_shared_not_copied():
    model, ctx, _, gm = micro_context(1)
    pair = partition(gm, ctx)
    params = {p.data_ptr() for p in model.parameters()}
    for graph in (pair.full, pair.shallow):
        graph_params = [t.data_ptr() for t in list(graph.parameters()) + list(graph.buffers())]
        assert graph_params and set(graph_params) <= params
    assert len(list(pair.shallow.parameters())) < len(list(pair.full.parameters()))
