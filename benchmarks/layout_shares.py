"""The shallow/full FLOP share r of the first skip branches, per supported pipeline layout, at full size.

Each U-Net is built from its published config on the meta device (no weights, no download;
SVD with random weights, as its forward mixes in a CPU tensor), captured and cut by dcfx, and
both graphs are FLOP-counted on meta tensors (``dcfx.branches``). For ControlNet pipelines the
ControlNet runs on every step, shallow ones included, so the pipeline's share is
(controlnet + shallow) / (controlnet + full); the JSON also keeps the U-Net-only share.

The latent-diffusion ``UNetModel`` (CompVis ``openaimodel.py``: the LDM and Stable Diffusion
reference code, and what ComfyUI and A1111 run) is measured in the configs of the paper's LDM-4-G
(``cin256-v2.yaml``: classes enter as a one-token context) and of SD 1.5 (``v1-inference.yaml``);
it needs ``pip install --no-deps stable-diffusion-sdkit einops omegaconf``.

Usage:
    python benchmarks/layout_shares.py                 # every layout (~8 min on 2 CPU cores)
    python benchmarks/layout_shares.py --only sd15,svd
Writes docs/benchmarks/layout_shares.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel, UNet2DModel, UNetSpatioTemporalConditionModel
from graph_speed import log, machine_info
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import dcfx
from dcfx.branches import branches_of_call, ideal_speedup
from dcfx.models import spec_for
from dcfx.zoo import CONFIGS

SD15 = CONFIGS["sd15"]
SD21 = {
    **SD15,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "sample_size": 96,
}
SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SVD_XT = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "num_attention_heads": (5, 10, 20, 20),
    "num_frames": 25,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
}
DDPM_CIFAR10 = {
    "sample_size": 32,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
# The paper's LDM-4-G (ImageNet 256, 64x64x3 latents, channel mult 1, 2, 3, 5 of 192, attention
# at 32, 16 and 8, 1000 classes), written as a class-conditional UNet2DModel.
LDM4G = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (192, 384, 576, 960),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,
    "num_class_embeds": 1001,
}

# name: (pipelines, model class, config, sample shape with classifier-free guidance batch)
LAYOUTS: dict[str, tuple[str, type, dict[str, Any], tuple[int, ...]]] = {
    "sd15": (
        "SD 1.5: txt2img, img2img, LCM (+timestep_cond)",
        UNet2DConditionModel,
        SD15,
        (2, 4, 64, 64),
    ),
    "sd15-inpaint": ("SD 1.5 inpaint (9 channels)", UNet2DConditionModel, {**SD15, "in_channels": 9}, (2, 9, 64, 64)),
    "sd15-controlnet": ("SD 1.5 + ControlNet", UNet2DConditionModel, SD15, (2, 4, 64, 64)),
    "sd21": ("SD 2.1 (768, v-prediction)", UNet2DConditionModel, SD21, (2, 4, 96, 96)),
    "sdxl": ("SDXL: txt2img, img2img", UNet2DConditionModel, SDXL, (2, 4, 128, 128)),
    "sdxl-controlnet": ("SDXL + ControlNet", UNet2DConditionModel, SDXL, (2, 4, 128, 128)),
    "svd": ("SVD-XT (25 frames, 576x1024)", UNetSpatioTemporalConditionModel, SVD_XT, (2, 25, 8, 72, 128)),
    "ddpm": ("DDPM CIFAR-10 (DDPM, DDIM pipelines)", UNet2DModel, DDPM_CIFAR10, (1, 3, 32, 32)),
    "ldm4g": ("LDM-4-G-like class-conditional UNet2DModel", UNet2DModel, LDM4G, (2, 3, 64, 64)),
}
# The latent-diffusion UNetModel: name: (pipelines, config, sample shape, context tokens).
LDM_LAYOUTS: dict[str, tuple[str, dict[str, Any], tuple[int, ...], int]] = {
    "ldm4g-unetmodel": (
        "LDM-4-G (cin256-v2), latent-diffusion UNetModel",
        {
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 192,
            "attention_resolutions": [8, 4, 2],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 5],
            "num_heads": 1,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 512,
        },
        (2, 3, 64, 64),
        1,  # a ClassEmbedder's one-token context
    ),
    "sd15-unetmodel": (
        "SD 1.5 (v1-inference), latent-diffusion UNetModel: CompVis, ComfyUI, A1111",
        {
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_heads": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 768,
            "use_checkpoint": True,
            "legacy": False,
        },
        (2, 4, 64, 64),
        77,
    ),
}
BRANCHES = (0, 1, 2)
REAL_WEIGHTS = {"svd"}


def controlnet_flops(unet: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one call of a ControlNet made for ``unet`` (same down blocks), on meta tensors."""
    cfg = unet.config
    keys = [
        "block_out_channels",
        "down_block_types",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "transformer_layers_per_block",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    ]
    with torch.device("meta"):
        net = ControlNetModel(**{k: cfg[k] for k in keys if k in cfg}).eval()
    spec = spec_for(unet)
    call = spec.example_call(unet, shape, torch.float32, torch.device("meta"))
    call.pop("timestep_cond", None)
    image = torch.empty(shape[0], 3, shape[2] * 8, shape[3] * 8, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(controlnet_cond=image, **call)
    return counter.get_total_flops()


def measure_ldm(name: str) -> tuple[str, torch.nn.Module, tuple[int, ...], list[dcfx.BranchInfo]]:
    """Branches of a latent-diffusion UNetModel config, with its context length."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    pipelines, config, shape, tokens = LDM_LAYOUTS[name]
    with torch.device("meta"):
        unet = UNetModel(**config).eval()
    spec = spec_for(unet)
    call = spec.example_call(unet, shape, torch.float32, torch.device("meta"))
    call["context"] = call["context"][:, :tokens]
    return pipelines, unet, shape, branches_of_call(unet, call)


def measure(name: str) -> dict[str, Any]:
    start = time.perf_counter()
    if name in LDM_LAYOUTS:
        pipelines, unet, shape, infos = measure_ldm(name)
    else:
        pipelines, cls, config, shape = LAYOUTS[name]
        # SVD's AlphaBlender makes a CPU tensor in its forward: that model needs real weights.
        with torch.device("cpu" if name in REAL_WEIGHTS else "meta"):
            unet = cls(**config).eval()
        infos = dcfx.branches(unet, shape)
    extra = controlnet_flops(unet, shape) if name.endswith("controlnet") else 0
    rows = []
    for info in infos[: len(BRANCHES)]:
        r = (info.shallow_flops + extra) / (info.full_flops + extra)
        rows.append(
            {
                "branch": info.branch,
                "up_layer": info.up_layer,
                "cache_shape": list(info.cache_shape),
                "r_unet": info.flop_share,
                "r": r,
                "ideal": {n: ideal_speedup(n, r) for n in (2, 3, 5, 10)},
            }
        )
    return {
        "layout": name,
        "pipelines": pipelines,
        "model_class": type(unet).__name__,
        "sample_shape": list(shape),
        "full_gflops": infos[0].full_flops / 1e9,
        "controlnet_gflops": extra / 1e9,
        "branches": rows,
        "seconds": time.perf_counter() - start,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Shallow/full FLOP share r per layout (full-size configs, meta tensors)",
        "",
        "Command: `python benchmarks/layout_shares.py`. r counts the whole denoiser call; with",
        "ControlNet it includes the ControlNet, which runs on every step. Ideal 1:N speedup",
        "N / (1 + (N - 1) r). The `-unetmodel` rows are the latent-diffusion `UNetModel` (CompVis",
        "`openaimodel.py`; `pip install --no-deps stable-diffusion-sdkit einops omegaconf`); LDM-4-G's",
        "classes enter it as a one-token context.",
        "",
        "| layout | pipelines | sample | full GFLOP | r branch 0 | r branch 1 | r branch 2 "
        "| ideal N=3, branch 0 | ideal N=5, branch 0 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        b = res["branches"]
        rs = " | ".join(f"{row['r']:.3f}" for row in b)
        gflops = res["full_gflops"] + res["controlnet_gflops"]
        lines.append(
            f"| {res['layout']} | {res['pipelines']} | {'x'.join(map(str, res['sample_shape']))} | {gflops:,.0f} | "
            f"{rs} | {b[0]['ideal'][3]:.2f}x | {b[0]['ideal'][5]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = [*LAYOUTS, *LDM_LAYOUTS]
    parser.add_argument("--only", help="comma-separated layouts: " + ", ".join(known))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown layouts {unknown}; known: {', '.join(known)}")
    ldm = [n for n in names if n in LDM_LAYOUTS]
    if ldm and importlib.util.find_spec("ldm") is None:
        parser.error(
            f"layouts {ldm} need the latent-diffusion code: pip install --no-deps stable-diffusion-sdkit einops "
            f"omegaconf (or leave them out with --only)"
        )
    results = []
    for name in tqdm(names, desc="layouts"):
        results.append(measure(name))
        log(f"{name}: r = {[round(row['r'], 4) for row in results[-1]['branches']]} ({results[-1]['seconds']:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layout_shares.json").write_text(
        json.dumps({"machine": machine_info(), "layouts": results}, indent=1) + "\n"
    )
    (args.out / "layout_shares.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
