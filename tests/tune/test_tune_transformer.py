"""dcfx.tune on diffusion transformers: block ranges (first, last) where a U-Net has branches.

The search, the cost model, the reports and the check are the U-Net's (tests/tune/test_tune.py);
here: the cuts searched, the sampling loop (the pipeline's own), and sweeps on a tiny SD3 and Sana.
"""

from __future__ import annotations

import json

import pytest
import torch

import dcfx
from dcfx.branches import BlockRangeInfo, BranchInfo
from dcfx.models import spec_for
from dcfx.tune import TuneSettingsError, candidates, load_workload, tune
from dcfx.tune.cuts import block_range_grid, cut_name, searched_shares
from dcfx.tune.workload import TransformerWorkload, generate_transformer
from tests.transformers.tiny import BUILDERS

QUIET = {"progress": False, "log": lambda msg: None}


def ranges(blocks: int) -> list[BlockRangeInfo]:
    """Rows as dcfx.branches gives them for a transformer of ``blocks`` blocks (r: blocks kept / blocks)."""
    return [BlockRangeInfo(f, b, (), 100 * blocks, 100 * (f + b), {}) for f in range(blocks) for b in range(blocks - f)]


def test_the_default_grid_is_powers_of_two_that_leave_a_block_to_cache():
    assert block_range_grid(4, None, None) == [(f, b) for f in (1, 2) for b in (0, 1, 2)]
    shares = searched_shares(ranges(4), None, None, None, log=lambda m: None)
    assert list(shares) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert shares[(1, 2)] == pytest.approx(0.75)
    big = searched_shares(ranges(57), None, None, None, log=lambda m: None)  # Flux's 19 + 38 blocks
    assert len(big) == 6 * 7 - 1 and (8, 0) in big and (32, 16) in big and (32, 32) not in big


def test_given_values_combine_and_pairs_without_a_cached_block_are_skipped_aloud():
    said = []
    shares = searched_shares(ranges(4), None, (1, 3), (0, 1), log=said.append)
    assert list(shares) == [(1, 0), (1, 1), (3, 0)]
    assert said == ["dcfx tune: skipping (first, last) pairs that leave no block of 4 to cache: [(3, 1)]"]


@pytest.mark.parametrize(
    ("infos", "branches", "first", "last", "match"),
    [
        (ranges(4), (0,), None, None, r"branches=\[0\] names U-Net skip branches; .* transformer of 4 blocks, cut by"),
        (ranges(4), None, (3,), (2,), r"first=\[3\] and last=\[2\] leave no block to cache on this model of 4 blocks"),
        (
            [BranchInfo(0, "up", (), [], 10, 1)],
            None,
            (1,),
            None,
            r"first=/last= name .* U-Net, .* give branches= \(valid: 0\.\.0\)",
        ),
    ],
)
def test_the_wrong_knob_for_the_model_is_refused_by_name(infos, branches, first, last, match):
    with pytest.raises(ValueError, match=match):
        searched_shares(infos, branches, first, last, log=lambda m: None)


def test_candidates_of_block_ranges_carry_first_and_last():
    pool, _ = candidates({(1, 0): 0.25, (2, 1): 0.75}, 8, [2, 4], ["uniform"], 1.0, 2, 1.4, step_counts=(8, 4))
    cached = [c for c in pool if c.caches]
    assert {(c.config.first, c.config.last) for c in cached} == {(1, 0), (2, 1)}
    assert all(c.config.branch is None and "branch" not in c.config.to_dict() for c in pool)
    plain = [c for c in pool if not c.caches]  # no cache at 4 steps runs through the first cut's graphs
    assert [(c.config.cut, c.config.interval, c.steps) for c in plain] == [((1, 0), 1, 4)]
    by = {(c.steps, c.config.cut, c.config.interval): c for c in cached}
    assert by[(8, (1, 0), 4)].predicted_s == pytest.approx((2 + 6 * 0.25) / 8)
    assert cut_name(by[(8, (2, 1), 2)].config.to_dict()) == "F2B1"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A diffusers pipeline folder with a tiny SD3 transformer and its flow-matching scheduler."""
    folder = tmp_path_factory.mktemp("sd3")
    tiny = BUILDERS["sd3"]()
    tiny.transformer.save_pretrained(folder / "transformer")
    tiny.pipe.scheduler.save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def sd3_work(sd3_folder):
    return load_workload(str(sd3_folder), "flow")


def test_the_sampling_loop_is_the_pipelines():
    tiny = BUILDERS["sd3"]()
    tiny.pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    call = tiny.call
    with torch.no_grad():
        want = tiny.pipe(
            prompt_embeds=call["prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            guidance_scale=1.0,
            latents=noise,
            num_inference_steps=4,
            output_type="latent",
        ).images
    cond = {"encoder_hidden_states": call["prompt_embeds"], "pooled_projections": call["pooled_prompt_embeds"]}
    scheduler = type(tiny.pipe.scheduler).from_config(tiny.pipe.scheduler.config)
    got = generate_transformer(tiny.transformer, spec_for(tiny.transformer), scheduler, noise, cond, 4)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# Wan's two captures take 11 s: the slow tier (its cut is checked fast in tests/transformers).
@pytest.mark.parametrize("name", ["flux", "pixart", "dit", "sana", pytest.param("wan", marks=pytest.mark.slow)])
def test_every_layout_samples_at_interval_one_as_plainly(name, tmp_path):
    tiny = BUILDERS[name]()
    tiny.transformer.save_pretrained(tmp_path)
    work = load_workload(str(tmp_path), "ddim")
    assert isinstance(work, TransformerWorkload)
    size = 8
    noise, cond = work.inputs([0, 1], size)
    assert noise.shape == spec_for(work.unet).sample_shape(work.unet, 2, size, size)
    plain = work.sample(work.unet, work.scheduler(), noise, cond, 3)
    fast = dcfx.compile(work.unet, first=1, last=1, interval=1, scheduler=work.scheduler())
    torch.testing.assert_close(work.sample(fast, fast.scheduler, noise, cond, 3), plain, atol=0, rtol=0)
    assert fast.stats == {"full": 3, "shallow": 0} and plain.shape == noise.shape  # a learned variance split off
    cached = dcfx.compile(work.unet, first=1, last=1, interval=3, scheduler=work.scheduler())
    assert not torch.equal(work.sample(cached, cached.scheduler, noise, cond, 3), plain)
    assert cached.stats == {"full": 1, "shallow": 2}


@pytest.mark.slow
def test_tune_searches_block_ranges_and_checks_the_choice(sd3_work, tmp_path):
    options = {
        **{"steps": 5, "batch": 1, "size": 8, "seeds": 2, "repeats": 2, "max_rounds": 3, "tolerance": 0.5},
        **{"first": (1,), "last": (0, 1), "intervals": (2, 3), "schedules": ("uniform",), "forecasts": ("none",)},
        **{"min_speedup": 1.0, "latency": 1e3, "out": tmp_path, **QUIET},  # a goal that prunes nothing
    }
    result = tune(sd3_work, **options)
    assert result.workload["model_class"] == "SD3Transformer2DModel" and result.workload["scheduler"] == "flow"
    got = {(p.config["first"], p.config["last"], p.config["interval"]) for p in result.measurements}
    assert got == {(f, b, n) for f in (1,) for b in (0, 1) for n in (2, 3)}
    assert all("branch" not in p.config and 0 < p.psnr_db < 100 for p in result.measurements)
    # FLOP shares are dcfx.branches' rows of this model at the tuned shape.
    shares = {(b.first, b.last): b.flop_share for b in dcfx.branches(sd3_work.unet, (1, 4, 8, 8))}
    assert all(
        p.flop_share == pytest.approx(shares[(p.config["first"], p.config["last"])]) for p in result.measurements
    )
    # The written config compiles to a runtime cut at that block range; its fresh run gives the tuner's images.
    cfg = dcfx.DeepCacheConfig.load(tmp_path / "config.json")
    assert cfg.to_dict() == result.chosen.config and cfg.blocks == (result.chosen.config["first"], cfg.last)
    assert dcfx.compile(sd3_work.unet, config=tmp_path / "config.json").deepcache_config.cut == cfg.cut
    assert result.check["psnr_db"] == pytest.approx(result.chosen.psnr_db, abs=1e-6)
    report = (tmp_path / "report.md").read_text()
    assert "| blocks | N | schedule | forecast | steps |" in report and "(plain transformer)" in report
    for p in result.measurements:
        assert f"| F1B{p.config['last']} | {p.config['interval']} | uniform | none | 5 | {p.flop_share:.3f} |" in report
    assert json.loads((tmp_path / "results.json").read_text())["chosen"] == result.chosen.config
    again = tune(sd3_work, **{**options, "verify": False})
    assert again.counts["measured"] == 0 and again.counts["cached"] == len(result.measurements)


@pytest.mark.slow  # a second sweep (10 s); Sana's sampling loop is checked fast above
def test_sana_tunes_its_block_ranges(tmp_path):
    # A pipeline folder as save_pretrained writes it; Sana's prompt mask is part of each seed's conditioning.
    tiny = BUILDERS["sana"]()
    tiny.pipe.save_pretrained(tmp_path / "sana")
    work = load_workload(str(tmp_path / "sana"), "flow")
    _, cond = work.inputs([0, 1], 4)
    assert cond["encoder_attention_mask"].shape == cond["encoder_hidden_states"].shape[:2] == (2, 8)
    options = {
        **{"steps": 4, "batch": 1, "size": 4, "seeds": 2, "repeats": 1, "max_rounds": 2, "tolerance": 0.5},
        **{"first": (1,), "last": (0, 1), "intervals": (2,), "schedules": ("uniform",), "forecasts": ("none",)},
        **{"min_speedup": 1.0, "latency": 1e3, "out": tmp_path / "out", **QUIET},
    }
    result = tune(work, **options)
    assert result.workload["model_class"] == "SanaTransformer2DModel"
    got = {(p.config["first"], p.config["last"], p.config["interval"]) for p in result.measurements}
    assert got == {(1, 0, 2), (1, 1, 2)}
    assert all(0 < p.psnr_db < 100 for p in result.measurements)
    cfg = dcfx.DeepCacheConfig.load(tmp_path / "out" / "config.json")
    assert cfg.to_dict() == result.chosen.config
    assert result.check["psnr_db"] == pytest.approx(result.chosen.psnr_db, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"branches": (0,)}, r"branches=\[0\] names U-Net skip branches"),
        ({"first": (2,), "last": (2,)}, "leave no block to cache on this model of 4 blocks"),
        ({"branches": (0,), "first": (1,)}, r"branches=\[0\] and first=/last= given together"),
        ({"last": (-1,)}, r"last must be ints >= 0, got \[-1\]"),
    ],
)
def test_bad_block_ranges_are_refused_before_measuring(sd3_work, tmp_path, kwargs, match):
    with pytest.raises(TuneSettingsError, match=match):
        tune(sd3_work, size=8, out=tmp_path / "out", **QUIET, **kwargs)
    assert not (tmp_path / "out" / "cache.json").exists()
