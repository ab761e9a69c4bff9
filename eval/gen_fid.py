"""Relative FID of a ``cat-gen`` run's samples at equal N (a smoke check, not a quality claim).

    python -m eval.gen_fid --run RUN --images ../shared/data/devset --n 48 --ratio 16

FID from a few dozen images is dominated by its small-sample bias, so only comparisons at the same
N mean anything. Three sets are compared with the same N real images (a seeded draw from
``--images``, downscaled like the tokens to ``--max-side``): the run's samples, samples of the
*same architecture untrained* (the floor any training must beat), and the VAE's reconstructions of
*other* real images at the same ratio (what a perfect generator over this VAE could reach). The
generator's figure should sit between the two. Writes JSON (``--out``) and prints one table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cat_foundations.atomic import atomic_write_json
from cat_foundations.images import limit_max_side, load_image, pil_to_tensor, tensor_to_pil
from cat_generation.config import GeneratorConfig
from cat_generation.generator import CONFIG_NAME, LatentGenerator
from cat_generation.sample import SampleSettings, generate, read_run_info
from eval.metrics import fid_from_features, load_inception
from nested_vae import NestedVAE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _features(inception, images) -> torch.Tensor:
    """Inception features, one image at a time (sizes differ; the extractor resizes each to 299)."""
    batches = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None] for image in images]
    return torch.cat([inception(batch) for batch in batches])


def _real_images(folder: Path, count: int, max_side: int, seed: int) -> list:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:count]
    return [limit_max_side(load_image(paths[int(i)]), max_side) for i in order]


def _reconstructions(images, vae_name: str, ratio: int) -> list:
    vae = NestedVAE.from_pretrained(vae_name)
    out = []
    with torch.no_grad():
        for image in images:
            x = pil_to_tensor(image)[None]
            latent = vae.encode(x, ratio).latent_dist.mode()
            out.append(tensor_to_pil(vae.decode(latent, ratio, output_size=x.shape[-2:]).sample[0]))
    return out


def _untrained_copy(run: Path, workdir: Path) -> Path:
    """A run folder with the same config, stats and info but freshly initialised weights."""
    shutil.copytree(run, workdir, dirs_exist_ok=True)
    config = GeneratorConfig.from_dict(json.loads((run / CONFIG_NAME).read_text()))
    torch.manual_seed(0)
    LatentGenerator(config).save_pretrained(workdir)
    return workdir


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of the real images")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--ratio", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    info = read_run_info(args.run)
    real = _real_images(args.images, 2 * args.n, args.max_side, args.seed)
    reference, held = real[: args.n], real[args.n :]
    sets = {}
    settings = dict(n=args.n, ratio=args.ratio, steps=args.steps, seed=args.seed)
    sets["trained generator"] = generate(SampleSettings(run=args.run, **settings)).images
    with tempfile.TemporaryDirectory() as workdir:
        untrained = _untrained_copy(args.run, Path(workdir))
        sets["untrained generator (same architecture)"] = generate(
            SampleSettings(run=untrained, **settings)
        ).images
    sets[f"VAE reconstructions of other real images ({args.ratio}x)"] = _reconstructions(
        held, info.get("vae") or "default", args.ratio
    )
    inception = load_inception()
    real_features = _features(inception, reference)
    results = {
        "n": args.n,
        "ratio": args.ratio,
        "steps": args.steps,
        "run": str(args.run),
        "fid": {
            name: fid_from_features([real_features], [_features(inception, images)])
            for name, images in sets.items()
        },
    }
    print(f"FID at N={args.n} (relative only), {args.ratio}x:")
    for name, value in results["fid"].items():
        print(f"  {value:8.1f}  {name}")
    if args.out:
        atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
