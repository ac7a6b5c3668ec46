"""README prompts through the engine (kiln.engine.Engine on the default catalog, model defaults: 8
steps, true CFG 3), seeds 0-5 in a row, 128-pixel thumbnails: mini-polish-readme-prompts-20261206.webp.
Run from the repository root: python bench/results/mini-polish-readme-prompts-20261206.py"""
from PIL import Image
from kiln.catalog import load_catalog
from kiln.engine import Engine, GenerationRequest
eng = Engine(load_catalog(), device="cpu")
prompts = ["a large yellow star at the center on a blue background", "a large green square at the center on a white background", "a large red triangle at the center on a black background"]
sheet = Image.new("RGB", (128 * 6, 128 * len(prompts)))
for r, p in enumerate(prompts):
    for s in range(6):
        im = eng.generate(GenerationRequest.create(family="flux", model="mini", task="t2i", format="512", prompt=p, seed=s)).outputs[0].image
        sheet.paste(im.resize((128, 128)), (s * 128, r * 128))
sheet.save("bench/results/mini-polish-readme-prompts-20261206.webp", quality=90)
