"""Trains the bundled digits transformer (dcfx/data/digits-dit) from scratch on scikit-learn's digits.

The recipe of train_digits.py (same images, seed, noise schedule, 10% of the labels dropped to
the null class, AdamW with warm-up and cosine decay, an EMA of the weights, which is what is
saved) applied to ``dcfx.digits_dit.DIT_CONFIG``, a DiT of 8 blocks. The defaults take about
15 minutes on 2 CPU cores. Writes the model folder and train_log.json; with ``--eval`` also the
bundled classifier's accuracy on samples of the trained model.

Usage:
    python benchmarks/train_digits_dit.py --eval                  # writes dcfx/data/digits-dit
    python benchmarks/train_digits_dit.py --steps 50 --out /tmp/dit   # a quick smoke run
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

from dcfx.digits import NULL_CLASS, NUM_CLASSES, digit_images, load_classifier
from dcfx.digits_dit import DATA_DIR, DIT_CONFIG, generate, new_model, save_model
from dcfx.quality import accuracy


def sample_accuracy(transformer: torch.nn.Module, scheduler: object, per_class: int, steps: int) -> float:
    """Returns the share of generated digits (DDIM, seed 0) that the bundled classifier reads as requested."""
    classifier, _, _ = load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    images = generate(transformer, scheduler, labels, steps=steps)
    with torch.no_grad():
        return accuracy(classifier(images), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--drop", type=float, default=0.1, help="share of labels replaced by the null class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=DIT_CONFIG["num_layers"], help="transformer blocks")
    parser.add_argument("--heads", type=int, default=DIT_CONFIG["num_attention_heads"])
    parser.add_argument("--head-dim", type=int, default=DIT_CONFIG["attention_head_dim"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a loaded host)")
    parser.add_argument("--eval", action="store_true", help="also score 20 samples per class (DDIM 50)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, labels = digit_images()
    config = DIT_CONFIG | {"num_layers": args.layers, "num_attention_heads": args.heads}
    model = new_model(args.seed, config | {"attention_head_dim": args.head_dim})
    # Eval mode while training: the only layers that differ are dropout (0 here) and the label
    # embedding of every block, which would drop labels on its own, block by block; the null
    # class is dropped below instead, once per image, from the seeded generator.
    transformer = model.transformer.eval()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    params = list(transformer.parameters())
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
    bar = tqdm(range(args.steps), desc="training digits DiT", mininterval=10)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.drop] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        xt = noise_scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(transformer(xt, t, class_labels=y).sample, noise)
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

    model.transformer = ema
    save_model(model, args.out)
    log = {
        "settings": vars(args) | {"out": str(args.out)},
        "config": dict(model.transformer.config),
        "dataset": {"images": len(images), "size": list(images.shape[1:])},
        "parameters": sum(p.numel() for p in model.transformer.parameters()),
        "train_seconds": round(seconds, 1),
        "loss_first_100": sum(losses[:100]) / len(losses[:100]),
        "loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    if args.eval:
        # Scored on the float16 weights as saved, which is what users load.
        from dcfx.digits_dit import load_model

        saved = load_model(args.out)
        log["sample_accuracy"] = {
            "ddim50_per_class20": sample_accuracy(saved.transformer, saved.scheduler(), 20, 50),
        }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    keys = ("parameters", "train_seconds", "loss_first_100", "loss_last_100", "sample_accuracy")
    print(json.dumps({k: log[k] for k in keys if k in log}))


if __name__ == "__main__":
    main()
