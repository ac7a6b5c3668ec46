"""Would channels-last weights speed up flux/mini's encoding stage (kiln.training.mini.encode_dataset)?
60 renders at 512x512 through a freshly built flux/mini VAE, one picture a call, with contiguous and
with channels-last weights, after a warm-up, three times side by side; times and the largest latent
difference. (85f853d switched it on from a cold first timing; this found no gain and it was removed.)
Run from the repository root: python bench/results/mini-encode-channels-last-20261206.py"""
import time

import torch

from kiln.training import mini

torch.set_num_threads(2)
vae = mini.build_vae().eval()
vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
rendered = mini.render_dataset({(512, 512): 60}, 1)
images, scenes = rendered[(512, 512)]


def contiguous():
    return torch.cat([(mini.scene_latents(vae, i, s) - 0.1) * 2.0 for i, s in zip(images, scenes, strict=True)])


contiguous()  # warm-up
for rep in range(3):
    t = time.perf_counter()
    ref = contiguous()
    a = time.perf_counter() - t
    t = time.perf_counter()
    vae.to(memory_format=torch.channels_last)
    out = mini.encode_dataset(vae, rendered)[(512, 512)][0]
    vae.to(memory_format=torch.contiguous_format)
    b = time.perf_counter() - t
    print(f"run {rep}: contiguous {a:.2f} s, channels-last {b:.2f} s, ratio {b / a:.3f}, "
          f"max latent difference {(out - ref).abs().max().item():.1e}", flush=True)
