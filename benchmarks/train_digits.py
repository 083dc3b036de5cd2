"""Trains the bundled digits U-Net (dcfx/data/digits) from scratch on scikit-learn's digits.

DDPM training (epsilon prediction, cosine betas, 1000 timesteps) of ``dcfx.digits.UNET_CONFIG``
with learned class tokens, 10% of the labels dropped to the null class for classifier-free
guidance, AdamW with warm-up and cosine decay, and an EMA of the weights, which is what is saved.
The defaults take about 20-25 minutes on 2 CPU cores. Writes the model folder and train_log.json.

Usage:
    python benchmarks/train_digits.py                       # writes dcfx/data/digits
    python benchmarks/train_digits.py --steps 50 --out /tmp/digits   # a quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from dcfx.digits import DATA_DIR, NULL_CLASS, digit_images, new_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--drop", type=float, default=0.1, help="share of labels replaced by the null class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, labels = digit_images()
    model = new_model(args.seed)
    unet, tokens = model.unet.train(), model.tokens.train()
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "tokens": tokens})).eval().requires_grad_(False)
    params = [*unet.parameters(), *tokens.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    noise_scheduler = DDPMScheduler(**model.scheduler_config)
    g = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training digits U-Net")
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.drop] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        xt = noise_scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=tokens(y)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), params, strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    seconds = time.perf_counter() - start

    model.unet, model.tokens = ema["unet"], ema["tokens"]
    save_model(model, args.out)
    log = {
        "settings": vars(args) | {"out": str(args.out)},
        "dataset": {"images": len(images), "size": list(images.shape[1:])},
        "parameters": sum(p.numel() for p in model.unet.parameters())
        + sum(p.numel() for p in model.tokens.parameters()),
        "train_seconds": round(seconds, 1),
        "loss_first_100": sum(losses[:100]) / len(losses[:100]),
        "loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: log[k] for k in ("parameters", "train_seconds", "loss_first_100", "loss_last_100")}))


if __name__ == "__main__":
    main()
