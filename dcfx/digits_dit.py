"""The bundled digits transformer: a small class-conditional DiT trained on the same digits as the U-Net.

It ships beside the digits U-Net (``dcfx.digits``) so that the transformer cut (DBCache:
``first=``/``last=``) can be measured offline as DeepCache's is: ``dcfx demo --model digits-dit``
and benchmarks/quality.py generate with it. The model is a diffusers ``DiTTransformer2DModel``
(``ada_norm_zero``: every block reads the timestep and the class through its own adaptive
layer norm) over the U-Net's pixel layout, 16x16 one-channel images in [-1, 1], cut into 2x2
patches (64 tokens: one per pixel of the 8x8 originals). Its label embedding has a row beyond
the ten digits, ``NULL_CLASS``, the empty condition of classifier-free guidance. Noise schedule,
sampler and classifier are the U-Net's.

Trained by benchmarks/train_digits_dit.py.

Example:
    >>> model = load_model()
    >>> images = generate(model.transformer, model.scheduler(), torch.arange(10), steps=25)
    >>> images.shape
    torch.Size([10, 1, 16, 16])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from torch import nn

from dcfx.digits import IMAGE_SIZE, NUM_CLASSES, SCHEDULER_CONFIG, check_request, denoise

DATA_DIR = Path(__file__).parent / "data" / "digits-dit"

DIT_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    # The label embedding adds the null class's row after these (diffusers' LabelEmbedding with
    # dropout): id NUM_CLASSES, the U-Net's NULL_CLASS.
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}

# The demo's cut (first, last): the first block runs on every step (at 1:5, 3.3x FLOP-ideal on DDIM 50).
DEMO_CUT = (1, 0)


@dataclass
class DigitsDiT:
    """The bundled transformer and its noise schedule."""

    transformer: DiTTransformer2DModel
    scheduler_config: dict[str, Any]

    def scheduler(self) -> DDIMScheduler:
        """Returns a fresh DDIM scheduler over the training betas (one per generation loop)."""
        return DDIMScheduler(**self.scheduler_config)


def new_model(seed: int = 0, config: dict[str, Any] | None = None) -> DigitsDiT:
    """Returns an untrained model with seeded random weights, initialised much as the DiT paper does.

    diffusers leaves the adaptive norms' modulation and the output head at PyTorch's defaults;
    DiT zeroes them, so that every block starts as the identity and the model predicts zero noise.
    Unlike DiT (std 0.02, for 400 k steps), class embeddings start at std 1: in a few thousand
    steps the small one left the class barely read (46% classifier accuracy after 2000 steps).
    """
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(**(config or DIT_CONFIG))
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    for block in transformer.transformer_blocks:
        embedding = block.norm1.emb
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=1.0)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for head in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return DigitsDiT(transformer, dict(SCHEDULER_CONFIG))


def save_model(model: DigitsDiT, directory: str | Path) -> None:
    """Writes the model as a diffusers-style folder (transformer/, scheduler/), weights in float16."""
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "transformer").mkdir(parents=True, exist_ok=True)
    model.transformer.save_config(directory / "transformer")
    weights = {k: v.half().contiguous() for k, v in model.transformer.state_dict().items()}
    save_file(weights, directory / "transformer" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    with open(directory / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "DDIMScheduler", **model.scheduler_config}, f, indent=2)


def load_model(directory: str | Path = DATA_DIR) -> DigitsDiT:
    """Returns the transformer stored in ``directory`` (the bundled one by default), float32, eval mode."""
    directory = Path(directory)
    if not (directory / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"no digits transformer in {directory}: train one with "
            f"python benchmarks/train_digits_dit.py --out {directory}"
        )
    transformer = DiTTransformer2DModel.from_pretrained(
        directory / "transformer", torch_dtype=torch.float32, low_cpu_mem_usage=False
    ).eval()
    with open(directory / "scheduler" / "scheduler_config.json") as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return DigitsDiT(transformer, config)


def generate(
    transformer: nn.Module,
    scheduler: Any,
    labels: torch.Tensor,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Returns images (B, 1, 16, 16) in [-1, 1] of the digits ``labels`` (B,), by DDIM (or ``scheduler``).

    ``dcfx.digits.generate`` for the transformer: the same noise for the same seed and labels,
    the same guidance (a batch of 2B, the second half ``NULL_CLASS``). ``transformer`` may be the
    plain model or a dcfx runtime compiled with ``first=``, ``last=`` and ``scheduler=scheduler``.
    """
    check_request(labels, guidance)

    def predict(x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # DiT's timestep embedding takes one timestep per row, as DiTPipeline passes it.
        return transformer(x, t.expand(len(x)), class_labels=ids).sample

    return denoise(predict, scheduler, labels, steps=steps, guidance=guidance, seed=seed, progress=progress)
