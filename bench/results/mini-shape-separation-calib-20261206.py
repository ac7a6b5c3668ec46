import sys, torch, numpy as np
sys.path.insert(0, "/tmp/full")
from pairs import pair_pool  # mini-shape-separation-pairs-20261206.py, as pairs.py
from diffusers import AutoencoderDC
from kiln.training import mini
vae = AutoencoderDC.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
pool = pair_pool(120, 5, pairs=[("circle", "square"), ("circle", "triangle"), ("triangle", "star")])
with torch.no_grad():
    za = vae.encode(mini.to_tensor([p[2] for p in pool])).latent; zb = vae.encode(mini.to_tensor([p[3] for p in pool])).latent
var = torch.cat([za, zb]).var().item()
gaps = ((za - zb) ** 2).mean((1, 2, 3)) / var
for k, name in enumerate(["circle-square", "circle-triangle", "triangle-star"]):
    print(name, round(gaps[k::3].mean().item(), 4))
print("latent var", round(var, 4))
