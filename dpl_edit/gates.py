"""Quality gates of the bundled model, measured on held-out world scenes.

    python -m dpl_edit.gates [--model FOLDER] [--out gates.json] [--quick]

Four numbers decide whether the model is fit to ship (targets in brackets):
- VAE reconstruction PSNR on 500 held-out scenes [>= 30 dB];
- generation: share of 200 held-out captions whose image (50 DDIM steps, guidance 7.5) shows
  every captioned shape in its captioned colour, judged by `checker` [>= 80 %];
- null-text inversion of held-out scenes reconstructs them [PSNR >= 28 dB];
- cross-attention localisation under NTI: best-threshold IoU of each object word's time-averaged
  map with its object's mask [mean >= 0.3], with its leakage (mass outside the object) beside it.
Held-out scenes come from a seed the training never draws from.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dpl_edit import checker, world
from dpl_edit.atomic import atomic_write_bytes
from dpl_edit.bench.metrics import best_iou, leakage, psnr
from dpl_edit.ddim import Ddim
from dpl_edit.images import image_to_tensor
from dpl_edit.inversion import invert, reconstruct
from dpl_edit.model import LoadedModel, load_model
from dpl_edit.text import encode_text, find_word

HELD_OUT_SEED = 424242
TARGETS = {"vae_psnr": 30.0, "generation_rate": 0.8, "nti_psnr": 28.0, "attention_iou": 0.3}


def _scenes(count: int, offset: int = 0, n_objects: int | None = None):
    return [world.scene_at(HELD_OUT_SEED, offset + i, n_objects).render() for i in range(count)]


@torch.no_grad()
def vae_psnr(model: LoadedModel, count: int = 500, batch: int = 50) -> float:
    """Mean PSNR (dB) of encode -> decode over held-out scenes."""
    values = []
    renders = _scenes(count)
    for start in range(0, count, batch):
        chunk = renders[start : start + batch]
        pixels = torch.cat([image_to_tensor(Image.fromarray(r.image)) for r in chunk])
        decoded = model.decode_latents(model.encode_image(pixels))
        values += [psnr(np.asarray(d), r.image) for d, r in zip(decoded, chunk, strict=True)]
    return float(np.mean(values))


@torch.no_grad()
def generate(
    model: LoadedModel, captions: list[str], steps: int = 50, guidance: float = 7.5, seed: int = 0
) -> list[Image.Image]:
    """Plain text-to-image sampling (DDIM, eta 0, classifier-free guidance)."""
    ddim = Ddim(model.scheduler, steps)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(captions), model.unet.config.in_channels, model.latent_size, model.latent_size)
    latent = torch.randn(shape, generator=generator).to(model.device, model.dtype)
    context = torch.cat([encode_text(model, [""] * len(captions)), encode_text(model, captions)])
    for t in ddim.timesteps:
        uncond, cond = model.predict(torch.cat([latent, latent]), t, context).chunk(2)
        latent = ddim.step(uncond + guidance * (cond - uncond), t, latent)
    return model.decode_latents(latent)


def generation_rate(model: LoadedModel, count: int = 200, batch: int = 50, steps: int = 50):
    """Share of held-out captions whose generated image passes the checker; and the images."""
    captions = [r.caption for r in _scenes(count, offset=10_000)]
    images: list[Image.Image] = []
    for start in range(0, count, batch):
        images += generate(model, captions[start : start + batch], steps, seed=start)
    hits = [
        all(c.ok for c in checker.check_image(np.asarray(im), cap))
        for im, cap in zip(images, captions, strict=True)
    ]
    return float(np.mean(hits)), images, captions


def inversion_gates(model: LoadedModel, count: int = 20, steps: int = 50) -> dict:
    """NTI reconstruction PSNR and object-word attention IoU / leakage on held-out scenes."""
    psnrs, ious, leaks = [], [], []
    for render in tqdm(_scenes(count, offset=20_000), desc="NTI gates"):
        inv = invert(
            model, Image.fromarray(render.image), render.caption, "nti", steps, progress=False
        )
        _, recon = reconstruct(model, inv)
        psnrs.append(psnr(np.asarray(recon), render.image))
        for word, mask in render.masks.items():
            positions = find_word(model.tokenizer, render.caption, word)
            attn = inv.attention[..., positions].sum(-1).numpy()
            others = np.zeros_like(mask)
            for other, other_mask in render.masks.items():
                if other != word:
                    others |= other_mask
            ious.append(best_iou(attn, mask))
            leaks.append(leakage(attn, mask, others, render.background_mask).outside)
    return {
        "nti_psnr": float(np.mean(psnrs)),
        "attention_iou": float(np.mean(ious)),
        "attention_leakage": float(np.mean(leaks)),
    }


def measure(model: LoadedModel, quick: bool = False) -> dict:
    """All gates; `quick` uses a tenth of the scenes (for progress checks during training)."""
    scale = 10 if quick else 1
    results = {"vae_psnr": vae_psnr(model, 500 // scale)}
    rate, images, captions = generation_rate(model, 200 // scale)
    results["generation_rate"] = rate
    results.update(inversion_gates(model, max(2, 20 // scale)))
    results["passed"] = {
        k: bool(results[k] >= v) for k, v in TARGETS.items() if not math.isnan(results[k])
    }
    results["checker_accuracy"] = checker.validate(seed=HELD_OUT_SEED + 1, count=300 // scale)
    results["samples"] = (images[:16], captions[:16])
    return results


def sample_sheet(images: list[Image.Image], path: Path, columns: int = 8) -> None:
    """A grid of generated samples, for the model card."""
    size = images[0].size[0]
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * size, (i // columns) * size))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the bundled model's quality gates.")
    parser.add_argument("--model", default=None, help="model folder (default: bundled)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--samples", type=Path, default=None, help="write a sample sheet PNG")
    parser.add_argument("--quick", action="store_true", help="a tenth of the scenes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.model)
    results = measure(model, args.quick)
    images, captions = results.pop("samples")
    if args.samples:
        sample_sheet(images, args.samples)
        results["sample_captions"] = captions
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())


if __name__ == "__main__":
    main()
