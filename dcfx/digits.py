"""The bundled digits model: a small class-conditional U-Net trained on scikit-learn's digits.

It ships with dcfx so that DeepCache's quality can be measured offline: ``dcfx demo`` and
benchmarks/quality.py generate with it. The U-Net is a ``UNet2DConditionModel`` with Stable
Diffusion's block types (cross-attention down and up blocks, a cross-attention mid block, two
resnets per block, so its branch ids match the reference helper's) that reads its class through
cross-attention on learned class tokens, as Stable Diffusion reads a prompt. Class ``NULL_CLASS``
is the empty condition of classifier-free guidance. Images are 16x16, one channel, in [-1, 1].

A small CNN classifier ships beside it: its accuracy on generated images is the analog of the CLIP
score, and a Frechet distance on its features against real digits the analog of FID.

Both are trained by scripts in benchmarks/ (train_digits.py, train_digit_classifier.py).

Example:
    >>> model = load_model()
    >>> images = generate(model.unet, model.tokens, model.scheduler(), torch.arange(10), steps=25)
    >>> images.shape
    torch.Size([10, 1, 16, 16])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn
from torch.nn import functional as F

DATA_DIR = Path(__file__).parent / "data" / "digits"
IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
TOKENS = 4
# The batch range of its exports (min, opt, max), tuned for the demo's 40 digits (4 per class).
# Guidance doubles the rows to 80: a loaded export runs a batch above its range in chunks, and
# 63 is the largest batch one graph of a diffusers U-Net serves (Upsample2D branches at 64).
DEMO_PER_CLASS = 4
DEMO_DIGITS = DEMO_PER_CLASS * NUM_CLASSES
BATCH_RANGE = (1, DEMO_DIGITS, 63)
TOKEN_DIM = 64

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "cross_attention_dim": TOKEN_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

# Training noise schedule; sampling uses DDIM over the same betas.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


class ClassTokens(nn.Module):
    """Maps class ids (B,) to cross-attention tokens (B, TOKENS, TOKEN_DIM); id NULL_CLASS is unconditional."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES + 1, TOKENS * TOKEN_DIM)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Returns the tokens of each label."""
        return self.embedding(labels).view(-1, TOKENS, TOKEN_DIM)


class DigitClassifier(nn.Module):
    """A small CNN over 16x16 digits: ``features`` (B, FEATURES) for the Frechet distance, logits for accuracy."""

    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.FEATURES, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Returns the penultimate features of images (B, 1, 16, 16) in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Returns class logits (B, 10)."""
        return self.head(self.features(images))


def digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns scikit-learn's 1797 handwritten digits as (N, 1, size, size) in [-1, 1], and their labels.

    The 8x8 originals (16 grey levels) are upscaled bilinearly. Needs scikit-learn, which ships
    the dataset inside its wheel: nothing is downloaded.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'dcfx[bench]'") from e
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.long)


@dataclass
class DigitsModel:
    """The bundled generator: the U-Net, its class tokens and its noise schedule."""

    unet: UNet2DConditionModel
    tokens: ClassTokens
    scheduler_config: dict[str, Any]

    def scheduler(self) -> DDIMScheduler:
        """Returns a fresh DDIM scheduler over the training betas (one per pipeline)."""
        return DDIMScheduler(**self.scheduler_config)


def new_model(seed: int = 0) -> DigitsModel:
    """Returns an untrained digits model with seeded random weights."""
    torch.manual_seed(seed)
    return DigitsModel(UNet2DConditionModel(**UNET_CONFIG), ClassTokens(), dict(SCHEDULER_CONFIG))


def save_model(model: DigitsModel, directory: str | Path) -> None:
    """Writes the model as a diffusers-style folder (unet/, scheduler/) plus class_tokens.safetensors.

    Weights are stored in float16 (half the bytes; the loader computes in float32).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "unet").mkdir(parents=True, exist_ok=True)
    model.unet.save_config(directory / "unet")
    weights = {k: v.half().contiguous() for k, v in model.unet.state_dict().items()}
    save_file(weights, directory / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    with open(directory / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "DDIMScheduler", **model.scheduler_config}, f, indent=2)
    save_file(
        {k: v.half().contiguous() for k, v in model.tokens.state_dict().items()}, directory / "class_tokens.safetensors"
    )


def load_model(directory: str | Path = DATA_DIR) -> DigitsModel:
    """Returns the digits model stored in ``directory`` (the bundled one by default), float32, eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"no digits model in {directory}: train one with python benchmarks/train_digits.py --out {directory}"
        )
    unet = UNet2DConditionModel.from_pretrained(
        directory / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False
    ).eval()
    tokens = ClassTokens()
    tokens.load_state_dict({k: v.float() for k, v in load_file(directory / "class_tokens.safetensors").items()})
    with open(directory / "scheduler" / "scheduler_config.json") as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return DigitsModel(unet, tokens.eval(), config)


def load_classifier(directory: str | Path = DATA_DIR) -> tuple[DigitClassifier, torch.Tensor, torch.Tensor]:
    """Returns the bundled classifier and the mean and covariance of its features on the real digits."""
    from safetensors.torch import load_file

    path = Path(directory) / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}: train one with python benchmarks/train_digit_classifier.py")
    tensors = {k: v.float() for k, v in load_file(path).items()}
    model = DigitClassifier()
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("real.")})
    return model.eval(), tensors["real.mean"].double(), tensors["real.cov"].double()


def check_request(labels: torch.Tensor, guidance: float) -> None:
    """Raises ValueError unless ``labels`` is a non-empty 1-d tensor of digits and ``guidance`` >= 1."""
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-d tensor of class ids, got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"labels must be digits 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
    if guidance < 1:
        raise ValueError(f"guidance must be >= 1 (1: no classifier-free guidance), got {guidance}")


# predict(x (B, 1, 16, 16), t (a scheduler timestep), class ids (B,)) -> the predicted noise (B, 1, 16, 16)
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise(
    predict: Predict,
    scheduler: Any,
    labels: torch.Tensor,
    *,
    steps: int,
    guidance: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Returns images (B, 1, 16, 16) in [-1, 1] of the digits ``labels`` (B,) by any diffusers scheduler.

    The sampling loop of every digits model: ``predict`` runs once per step, on the B inputs at
    ``guidance`` 1, or with classifier-free guidance on 2B (conditional, then ``NULL_CLASS``).
    The scheduler's input scaling (Euler's sigmas) is applied; for DDIM it is the identity.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    guided = guidance > 1
    ids = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guided else labels
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, leave=False, desc="denoising")
    for t in timesteps:
        eps = predict(scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t), t, ids)
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def generate(
    unet: nn.Module,
    tokens: ClassTokens,
    scheduler: Any,
    labels: torch.Tensor,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Returns images (B, 1, 16, 16) in [-1, 1] of the digits ``labels`` (B,), by DDIM (or ``scheduler``).

    The U-Net runs once per step: on the B conditional inputs at ``guidance`` 1, or, with
    classifier-free guidance (``guidance`` > 1), on a batch of 2B (conditional and unconditional)
    as Stable Diffusion pipelines do. The bundled model is best at 1: its unconditional branch
    is weak (``docs/benchmarks/quality/quality.md``). ``unet`` may be the plain U-Net or a dcfx runtime
    compiled with ``scheduler=scheduler``. The same seed and labels give the same initial noise.
    """
    check_request(labels, guidance)

    def predict(x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=tokens(ids)).sample

    return denoise(predict, scheduler, labels, steps=steps, guidance=guidance, seed=seed, progress=progress)
