"""Shape channels + a decoder tuned to the transformer's latents: A/B of the decoder before and after
`kiln.training.mini.tune_decoder`, on the same generated latents. For N held-out single-shape scenes
(canonical prompt, seed i, 8 steps, true CFG 3, 512x512): the shape read from the generated latents'
shape channels (decoder-independent: the channel with most weight where the shape channels are lit),
and the checker's shape on the picture each decoder draws from them. Usage: PIPELINE_DIR WORK_DIR N OUT.webp"""
import collections, json, random, sys, time
import numpy as np, torch
from PIL import Image
from diffusers import FluxPipeline
from kiln.training import mini, world

torch.set_num_threads(2)
path, work, n, out_png = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
tuned = pipe.vae
before = mini.build_vae()
before.load_state_dict(torch.load(f"{work}/before-decoder.pt")["vae"])
before.register_to_config(shift_factor=tuned.config.shift_factor, scaling_factor=tuned.config.scaling_factor)
before.eval()
rng = random.Random(77); scenes = []
while len(scenes) < n:
    sc = world.sample_scene(rng, held_out=True, two_groups=0.0)
    if sc.groups[0].count == 1:
        scenes.append(sc)
right = collections.Counter(); by = collections.Counter(); t0 = time.time(); tiles = []
for i, sc in enumerate(scenes):
    g = sc.groups[0]
    with torch.no_grad():
        packed = pipe(world.prompt(sc), negative_prompt="", true_cfg_scale=3.0, num_inference_steps=8, height=512,
                      width=512, max_sequence_length=32, generator=torch.Generator().manual_seed(i),
                      output_type="latent").images
        z = FluxPipeline._unpack_latents(packed, 512, 512, 32)
        raw = z / tuned.config.scaling_factor + tuned.config.shift_factor
        ch = z[0, mini.SHAPE_CHANNELS] / tuned.config.scaling_factor + tuned.config.shift_factor  # raw shape channels
        lit = ch.sum(0) > 0.5 * mini.SHAPE_ANCHOR
        latent_shape = world.SHAPES[int((ch * lit).sum((1, 2)).argmax())] if lit.any() else None
        pics = {name: mini.to_image(vae.decode(raw).sample.clamp(-1, 1)[0]) for name, vae in (("before", before), ("after", tuned))}
    right["latent"] += latent_shape == g.shape
    for name, pic in pics.items():
        reading = world.classify(pic)
        right[name] += reading.shape == g.shape
        right[name + "_colour"] += reading.colour == g.colour
        by[(name, g.size)] += reading.shape == g.shape
    by[("n", g.size)] += 1
    if i < 8:
        tiles.append(np.concatenate([np.asarray(world.render(sc, 512, 512).resize((160, 160))),
                                     np.asarray(pics["before"].resize((160, 160))), np.asarray(pics["after"].resize((160, 160)))], 0))
res = {k: round(v / n, 3) for k, v in right.items()}
res["by_size"] = {f"{name} {size}": round(by[(name, size)] / by[("n", size)], 3) for name in ("before", "after")
                  for size in world.SIZES if by[("n", size)]}
res["n"] = n; res["s"] = round(time.time() - t0)
Image.fromarray(np.concatenate(tiles, 1)).save(out_png, quality=80)
print(json.dumps(res), flush=True)
