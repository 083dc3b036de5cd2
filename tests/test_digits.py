"""The bundled digits model and classifier: shipped, small, trained, and exact under dcfx."""

from types import SimpleNamespace

import pytest
import torch
from DeepCache import DeepCacheSDHelper

import dcfx
from dcfx.digits import DATA_DIR, NUM_CLASSES, digit_images, generate, load_classifier, load_model


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_the_bundled_files_are_small_enough_to_ship():
    sizes = {p.name: p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in sizes and "classifier.safetensors" in sizes
    assert sum(sizes.values()) <= 8 * 2**20, sizes


def test_the_classifier_reads_real_digits():
    classifier, mean, cov = load_classifier()
    images, labels = digit_images()
    with torch.no_grad():
        assert (classifier(images).argmax(1) == labels).float().mean() > 0.95
    assert mean.shape == (classifier.FEATURES,) and cov.shape == (classifier.FEATURES,) * 2


def test_the_bundled_model_is_trained(model):
    # Random weights draw noise that the classifier reads at chance (about 10%).
    classifier, _, _ = load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat(2)
    images = generate(model.unet, model.tokens, model.scheduler(), labels, steps=25)
    with torch.no_grad():
        assert (classifier(images).argmax(1) == labels).float().mean() >= 0.8


def test_dcfx_on_the_digits_model_equals_the_reference_helper(model):
    labels = torch.arange(NUM_CLASSES)
    scheduler = model.scheduler()
    fast = dcfx.compile(model.unet, branch=2, interval=3, scheduler=scheduler)
    ours = generate(fast, model.tokens, scheduler, labels, steps=12)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=model.unet, scheduler=scheduler))
    helper.set_params(cache_interval=3, cache_branch_id=2)
    helper.enable()
    try:
        theirs = generate(model.unet, model.tokens, scheduler, labels, steps=12)
    finally:
        helper.disable()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    plain = generate(model.unet, model.tokens, scheduler, labels, steps=12)
    assert (ours - plain).abs().max() > 1e-3  # caching changed the images


def test_generate_rejects_bad_labels(model):
    with pytest.raises(ValueError, match=r"digits 0\.\.9"):
        generate(model.unet, model.tokens, model.scheduler(), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="non-empty 1-d"):
        generate(model.unet, model.tokens, model.scheduler(), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        generate(model.unet, model.tokens, model.scheduler(), torch.tensor([1]), guidance=0.5)


def test_a_missing_model_names_the_script_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_digits\.py"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_digit_classifier\.py"):
        load_classifier(tmp_path)
