"""Probe: are the blobs the average over what a caption leaves open? mini-shape-channels-probe-20261206.py
(same shape-channel VAE, same focus stage and reading) with the focus scenes made exact: no tilt and
no jitter, each shape exactly at its named position, so a canonical caption names one picture.
Usage: WORK_DIR (holding the VAE's vae.pt)"""
import dataclasses, random, runpy, sys
from kiln.training import mini, world

_focus = mini._focus_scene


def exact_focus_scene(rng: random.Random) -> world.Scene:
    scene = _focus(rng)
    g = scene.groups[0]
    return dataclasses.replace(scene, rotation=0.0, groups=(dataclasses.replace(g, centres=(world.POSITIONS[g.position],)),))


mini._focus_scene = exact_focus_scene
sys.argv = ["mini-shape-channels-probe-20261206.py", *sys.argv[1:]]
runpy.run_path(str(__import__("pathlib").Path(__file__).with_name("mini-shape-channels-probe-20261206.py")), run_name="__main__")
