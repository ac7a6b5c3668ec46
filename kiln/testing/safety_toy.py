"""A toy-size Stable Diffusion safety checker that flags pure magenta, built fully offline.

The real architecture (diffusers' ``StableDiffusionSafetyChecker``: a CLIP vision tower, a projection,
17 concept and 3 special-care embeddings with their thresholds) at 2 layers and 32 wide (about 25k
parameters, random seeded weights), with a ``CLIPImageProcessor`` cropping to 32x32, saved with
``save_pretrained`` so it loads through the same ``from_pretrained`` code as the real checker.

The one documented property: concept 0 is the normalised embedding of a pure magenta (#ff00ff)
image and its threshold is :data:`THRESHOLD`, so an image whose embedding is that close to magenta's
is flagged: magenta and near-magenta images are, the colours of :data:`NOT_FLAGGED` and noise are
not (checked when the toy is built). Every other concept and special-care threshold is above 1, which
no cosine reaches. Kept apart from :mod:`kiln.testing.toys`, whose source digest marks every built
pipeline toy stale when that module changes.

CLI: ``python -m kiln.testing.safety_toy DIR`` builds it at ``DIR`` (usable as ``safety_checker``).
"""

from __future__ import annotations

import sys
from pathlib import Path

MAGENTA = (255, 0, 255)
#: Colours the toy must not flag (with uniform noise); verified at build time.
NOT_FLAGGED = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0), "white": (255, 255, 255),
    "gray": (128, 128, 128), "yellow": (255, 255, 0), "cyan": (0, 255, 255), "purple": (128, 0, 128),
    "pink": (255, 128, 255), "orange": (255, 128, 0),
}
THRESHOLD = 0.99  # cosine to magenta's embedding; the nearest of NOT_FLAGGED sits near 0.95
NEVER = 2.0  # a threshold no cosine exceeds
SEED = 0
SIZE = 32


def build_safety_checker(out_dir: str | Path) -> Path:
    """Build the toy checker at ``out_dir`` (overwritten) and return the path."""
    import numpy as np
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor

    out = Path(out_dir)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": SIZE, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})

    def embed(images: list) -> torch.Tensor:
        pixels = processor(images=images, return_tensors="pt").pixel_values
        with torch.no_grad():
            return torch.nn.functional.normalize(model.visual_projection(model.vision_model(pixels)[1]))

    with torch.no_grad():
        model.concept_embeds.copy_(embed([Image.new("RGB", (SIZE, SIZE), MAGENTA)]).expand_as(model.concept_embeds))
        model.concept_embeds_weights.fill_(NEVER)
        model.concept_embeds_weights[0] = THRESHOLD
        model.special_care_embeds_weights.fill_(NEVER)
    noise = Image.fromarray(np.random.default_rng(SEED).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    others = [Image.new("RGB", (SIZE, SIZE), c) for c in NOT_FLAGGED.values()] + [noise]
    nearest = float((embed(others) @ model.concept_embeds[0]).max())
    if nearest > THRESHOLD - 0.01:  # the checker rounds scores to 3 decimals: keep a clear margin
        raise RuntimeError(f"toy safety checker: a colour it must not flag is {nearest:.4f} from magenta")
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kiln.testing.safety_toy DIR", file=sys.stderr)
        return 2
    print(build_safety_checker(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
