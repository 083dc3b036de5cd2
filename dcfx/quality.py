"""Image quality metrics of the kind the DeepCache paper reports, for the bundled digits model.

- ``psnr``: fidelity of cached images to the no-cache ones, per image.
- ``accuracy``: share of generated digits a classifier reads as the requested class (the analog of
  the CLIP score: does the image follow its condition).
- ``frechet_distance``: between Gaussians fitted to classifier features of generated and real
  digits (the analog of FID, which does the same with Inception features).

Example:
    >>> psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.2))  # data range 2 ([-1, 1])
    tensor([20.0000])
"""

from __future__ import annotations

import torch


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Returns the PSNR in dB of each image (B,) against its reference; inf where they are equal."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Returns the share of rows whose largest logit is at the row's label."""
    return (logits.argmax(1) == labels).double().mean().item()


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the mean (D,) and the unbiased covariance (D, D) of features (N, D), in float64."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Returns the Frechet distance between N(mean1, cov1) and N(mean2, cov2).

    ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))``, with the trace of the square root taken as
    that of the symmetric ``(C1^(1/2) C2 C1^(1/2))^(1/2)`` (same eigenvalues), so no complex
    ``sqrtm`` is needed.
    """
    root1 = _sqrtm_psd(cov1.double())
    middle = root1 @ cov2.double() @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mean1.double() - mean2.double()
    return float(diff @ diff + cov1.trace() + cov2.trace() - 2 * trace_root)
