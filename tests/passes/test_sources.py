"""torch.fx keeps the source of every GraphModule it compiles; dcfx lets go of its own."""

import pytest

import dcfx
from dcfx import graphs as graphs_module
from dcfx.passes import build_graph_pair, forget_graphs
from dcfx.passes.sources import cached_sources, source_key
from tests.fixtures import example_call, tiny_unet


def test_a_build_keeps_only_its_two_graphs_sources():
    unet = tiny_unet()
    (names, tensors), _ = dcfx.models.spec_for(unet).flatten(unet, (), example_call(unet))
    before = cached_sources()
    pair = build_graph_pair(unet, 1, names, tensors)
    assert cached_sources() - before == {source_key(pair.full), source_key(pair.shallow)}
    forget_graphs(pair.full, pair.shallow)
    assert cached_sources() - before == set()


@pytest.mark.slow
def test_the_runtime_releases_the_sources_of_graphs_it_drops(monkeypatch):
    monkeypatch.setattr(graphs_module, "MAX_GRAPH_PAIRS", 2)
    unet = tiny_unet()
    fast = dcfx.compile(unet, branch=0, interval=2)
    before = cached_sources()
    for size in (8, 12, 16, 20):  # four signatures, two kept
        call = example_call(unet, size=size)
        fast(**call)
        fast.reset()
    assert len(cached_sources() - before) == 4  # two pairs of two graphs
    fast.clear_graphs()
    assert cached_sources() - before == set()
    fast(**example_call(unet, size=8))
    del fast  # a runtime dropped without clear_graphs() releases its graphs too
    assert cached_sources() - before == set()
