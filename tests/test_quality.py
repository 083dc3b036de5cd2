"""Quality metrics: PSNR, accuracy, feature statistics and the Frechet distance, on known values."""

import math

import pytest
import torch

from dcfx.quality import accuracy, feature_stats, frechet_distance, psnr


def test_psnr_of_known_errors():
    ref = torch.zeros(3, 1, 4, 4)
    images = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), 2.0), torch.zeros(1, 4, 4)])
    values = psnr(images, ref)
    assert values[0].item() == pytest.approx(10 * math.log10(4 / 0.04))  # 20 dB
    assert values[1].item() == pytest.approx(0.0)  # error as large as the range
    assert math.isinf(values[2].item())
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(images, ref[:2])


def test_accuracy_counts_the_argmax():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


def test_feature_stats_match_numpy_conventions():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 3, generator=g)
    mean, cov = feature_stats(f)
    torch.testing.assert_close(mean, f.double().mean(0))
    centred = f.double() - mean
    torch.testing.assert_close(cov, centred.T @ centred / 49)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(f[:1])


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    mean, cov = feature_stats(a @ torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    assert frechet_distance(mean, cov, mean + shift, cov) == pytest.approx(5.25, abs=1e-8)
    # Diagonal covariances: sum of (sqrt(a) - sqrt(b))^2.
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    zero = torch.zeros(3)
    assert frechet_distance(zero, torch.diag(d1), zero, torch.diag(d2)) == pytest.approx(2.0)
    other_mean, other_cov = feature_stats(torch.randn(300, 4, generator=g, dtype=torch.float64))
    forward = frechet_distance(mean, cov, other_mean, other_cov)
    assert forward == pytest.approx(frechet_distance(other_mean, other_cov, mean, cov), rel=1e-9)
    assert forward > 0
