"""Train ``flux/mini``: the FLUX.1 architecture at a few million parameters, on the synthetic world.

Usage::

    python -m kiln.training.mini --out kiln/weights/flux-mini      # about an hour on 2 CPU cores
    python -m kiln.training.mini --out /tmp/mini --scale 0.1         # a quick smoke run

Everything is seeded (``--seed``); stages write into ``--work`` so that a later stage can be re-run
alone (``--from-stage``). The result is a diffusers ``FluxPipeline`` directory (weights stored in
float16, loaded as float32 on a CPU) plus ``lora/pastel`` (a LoRA trained on the same world drawn in
pastel colours) and ``kiln_mini.json`` (what it was trained on, how long it took, parameter counts).

Choices, and why:

- **VAE**: diffusers' ``AutoencoderDC`` (the deep-compression autoencoder of Sana: it down- and
  upsamples by pixel (un)shuffle) with 16 latent channels, FLUX.1's count, so the transformer's input
  is FLUX.1's 64 channels. Six levels make ``vae_scale_factor`` 32 (FLUX's is 8): a 512x512 image is
  a 16x16x16 latent and 64 transformer tokens after FluxPipeline's 2x2 packing, which keeps training
  and CPU inference cheap. Why this class: the previous weights' ``AutoencoderTiny`` (the class of
  TAEF1) upsamples by nearest neighbour, and its reconstructions of held-out scenes read back the
  right shape 45% of the time however long it trained, which capped the whole model at blobs; this
  one, with the steadiness term and the shape channels below, 58% after its 2,000 steps
  (``kiln_mini.json``; 62% without the shape channels; 77-83% without the steadiness term,
  bench/results/mini-drawn-latents-20261206.md section 5, but its latents were harder for the
  transformer: bench/results/mini-dcae-full-run-20261206.md). Its only normalisation is RMSNorm over each pixel's channels, so it trains on 128x128 crops of
  full-size renders (at the real scale, a sixteenth of the cost) and behaves the same on whole
  images: measured, ``AutoencoderKL``'s GroupNorms either wash out flat colours (a group per
  channel) or tie every pixel to whole-image statistics that crops do not have (one group). Its
  encoder has no block at full size (cheapest: the encoding stage encodes every training picture).
  Extra loss terms shape the latents for the transformer: their first three channels follow the
  image's colour averaged over each 32x32 patch; the next four say which shape covers the patch (one
  channel a shape, its share of the patch: the transformer then learns "square" as it learns "red",
  as a value a few tokens take, and the decoder draws the outline; :func:`train_vae` says what it
  fixed); the decoder learns from latents with a little noise added, so a sampler's imperfect
  latents still decode to clean shapes; and the latents stay steady when the picture moves a few
  pixels.
  ``shift_factor`` / ``scaling_factor`` standardise the latents afterwards. Its encoder's output is
  named ``latent`` where diffusers' img2img and inpaint pipelines look for ``latents``: Kiln's
  loader adapts it (``kiln.engine.families.base.expose_latents``); plain ``FluxPipeline`` needs nothing.
- **Text side**: small CLIP and T5 encoders with tokenizers learned from the caption corpus, trained
  jointly with the transformer through the diffusion loss. A packaged sentence encoder would need a
  non-transformers class behind FluxPipeline's ``text_encoder`` slots (no longer loadable by plain
  ``FluxPipeline.from_pretrained``) and brings tens of megabytes for a vocabulary of fifty words; the
  joint encoders keep the checkpoint a standard FLUX.1 one and learn exactly the binding of colours,
  shapes, counts and positions the world needs.
- **Transformer**: ``FluxTransformer2DModel`` (2 double + 4 single blocks, width 128 as two heads of
  64, no guidance embedding, like schnell), rectified flow (target = noise - data). It trains in
  three phases: 3000 steps on single shapes exactly at named positions, captioned in the canonical
  form (trained on the mixture from the start, it never learned where a prompt puts things), 1800 on
  the mixture of scenes and caption templates at half the rate, and 800 more of the first kind with
  a quarter of mixture batches, which bring back the shapes the mixture wears down
  (:func:`train_transformer` says what was measured). Timesteps from a logit-normal
  mixed with uniform and shifted toward noise as the sampler's schedule is, 10% empty captions (which the model learns as "anything": the catalog uses it
  for true classifier-free guidance), and an EMA of the weights. The loss weighs each latent pixel
  by how far it is from the image's background (up to 5x): shapes are a few pixels of a mostly flat
  latent, and unweighted the model learns backgrounds long before it learns what stands on them.
  It trains on several token grids at once (512x512 and every other image format of the render
  API), so that 1024x1024 and the wide formats look like 512x512, not like noise: FLUX's rotary
  positions are absolute, and a model that never saw row 15 does not know what to do there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.training import world

log = logging.getLogger("kiln.training.mini")

MAX_TOKENS = 32  # caption tokens, CLIP and T5 alike (the catalog's max_sequence_length)
LATENT_CHANNELS = 16  # FLUX.1's: the transformer's input is 64 channels, as in FLUX.1
VAE_FACTOR = 32
VAE_WIDTH = 32
VAE_LATENT_NOISE = 0.1
VAE_CROP = 128
VAE_SHIFT = 8  # pixels a crop moves for the latents' steadiness term (train_vae)
VAE_STEADY_WEIGHT = 1.0
SHAPE_CHANNELS = slice(3, 3 + len(world.SHAPES))  # latent channels that say which shape covers a patch
SHAPE_ANCHOR = 2.0  # their value where a shape covers the whole 32x32 patch
VAE_TEACHER = 0.75  # share of VAE steps that decode the true shape channels rather than the encoder's
TRANSFORMER_LR = 1e-3
MIXTURE_LR = 0.5  # the mixture steps' peak learning rate, a fraction of TRANSFORMER_LR (learning_rate)
POLISH_LR = 0.3  # the last phase's peak learning rate, a fraction of TRANSFORMER_LR (train_transformer)
POLISH_MIXTURE = 0.25  # the share of the last phase's batches drawn from the mixture
SHAPE_WEIGHT = 4.0
SAMPLER_SHIFT = 2.0  # the scheduler's static timestep shift, which training follows

# (width, height) of the token grids the transformer trains on, with their share of the batches and
# the batch size that keeps every batch about the same cost.
BUCKETS: dict[tuple[int, int], tuple[float, int]] = {
    (512, 512): (0.7, 32),
    (1024, 1024): (0.1, 8),
    (768, 1024): (0.05, 11),
    (1024, 768): (0.05, 11),
    (576, 1024): (0.05, 14),
    (1024, 576): (0.05, 14),
}


@dataclass
class Plan:
    """How much of everything; ``scale`` shrinks it all for a smoke run."""

    vae_steps: int = 2000
    vae_batch: int = 8
    images: dict[tuple[int, int], int] | None = None  # scenes rendered per size
    transformer_steps: int = 4800  # focus steps, then mixture steps
    focus_steps: int = 3000  # the first transformer steps, on single named-position shapes (see train_transformer)
    polish_steps: int = 800  # after them: focus steps with a quarter of mixture batches
    focus_images: int = 2000
    lora_images: int = 600
    lora_steps: int = 400

    @classmethod
    def scaled(cls, scale: float) -> Plan:
        base = {(512, 512): 4000, (1024, 1024): 240, (768, 1024): 100, (1024, 768): 100,
                (576, 1024): 120, (1024, 576): 120}
        return cls(
            vae_steps=max(5, round(2000 * scale)),
            images={k: max(8, round(v * scale)) for k, v in base.items()},
            transformer_steps=max(5, round(4800 * scale)),
            focus_steps=max(2, round(3000 * scale)),
            polish_steps=max(2, round(800 * scale)),
            focus_images=max(8, round(2000 * scale)),
            lora_images=max(8, round(600 * scale)),
            lora_steps=max(5, round(400 * scale)),
        )


# --- components ------------------------------------------------------------------------------------


def corpus(seed: int, n: int = 20000) -> list[str]:
    """Captions of training scenes: what the tokenizers are learned from."""
    rng = random.Random(seed)
    return [world.caption(world.sample_scene(rng), rng) for _ in range(n)] + [world.prompt(world.sample_scene(rng)) for _ in range(2000)]


def tokenizers(seed: int):
    """CLIP byte-level BPE learned on the corpus (1024 entries: every word of the world is one token)
    and a T5 Unigram tokenizer whose pieces are the corpus's words (characters as a fallback), so a
    caption is about as many tokens as words: the longest caption fits ``MAX_TOKENS`` in both."""
    from kiln.testing.toys import clip_tokenizer

    texts = corpus(seed)
    return clip_tokenizer(texts, vocab_size=1024, model_max_length=MAX_TOKENS), t5_word_tokenizer(texts)


def t5_word_tokenizer(texts: list[str]):
    import re

    from transformers import T5Tokenizer

    words = sorted({w for t in texts for w in re.findall(r"\w+", t.lower())})
    chars = sorted(set("".join(texts).lower()) - {" "})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [("\u2581", -6.0)] + [(c, -8.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def build_vae():
    """The pixel-shuffle VAE (see the module docstring): six levels of widths 16, 32, ..., one
    ``ResBlock`` a level (none at full size in the encoder, where it cost most), 16 latent channels.

    ``block_out_channels`` (FluxPipeline derives ``vae_scale_factor`` from its length) and
    ``shift_factor`` are not ``AutoencoderDC`` arguments: they are registered into its config, which
    ``save_pretrained``/``from_pretrained`` keep (diffusers logs that the class ignores them)."""
    from diffusers import AutoencoderDC

    widths = (VAE_WIDTH // 2,) + (VAE_WIDTH,) * 5
    vae = AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
        upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0,
    )
    vae.register_to_config(block_out_channels=list(widths), shift_factor=0.0)
    return vae


def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Raw (unstandardised) latents of ``x``, whichever name the VAE gives its encoder's output (the
    engine's reading, so a VAE that Kiln's loader adapted reads the same)."""
    from kiln.engine.families.base import vae_latents

    return vae_latents(vae, x)


def build_text(clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, projection_dim=64, hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
    ))
    return clip, t5


def build_transformer():
    from diffusers import FluxTransformer2DModel

    # Two heads of 64 (FLUX.1's own head size) rather than four of 32: 28 rotary dimensions per axis
    # give several frequencies that change usefully across an 8-16 token grid (12 gave one).
    return FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=4,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(8, 28, 28),
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLER_SHIFT, use_dynamic_shifting=False)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- stage 1: the VAE -------------------------------------------------------------------------------


def render_dataset(sizes: dict[tuple[int, int], int], seed: int, *, pastel: bool = False, focus: bool = False) -> dict:
    """Per size: the rendered images (N, H, W, 3 uint8) and their scenes. Rendered once: the VAE
    trains on crops of them and the transformer on their latents. ``focus``: only scenes of one shape
    at a named position (the transformer's first steps, :func:`train_transformer`)."""
    rng = random.Random(seed)
    out = {}
    for (w, h), n in sizes.items():
        scenes = [_focus_scene(rng) if focus else world.sample_scene(rng) for _ in range(n)]
        out[(w, h)] = (np.stack([np.asarray(world.render(sc, w, h, pastel=pastel)) for sc in scenes]), scenes)
        log.info("rendered %d %sscenes at %dx%d%s", n, "focus " if focus else "", w, h, " (pastel)" if pastel else "")
    return out


def _focus_scene(rng: random.Random) -> world.Scene:
    """One shape exactly at its named position, untilted: a canonical caption then names one picture
    (in the world a shape tilts and moves a little, and a caption names many). Measured in focus-stage
    probes of 3000 steps: shapes read right 44.2% with exact scenes, 36.7% with the world's
    (bench/results/mini-shape-channels-20261206.md, sections 5-6)."""
    while True:
        scene = world.sample_scene(rng, two_groups=0.0)
        g = scene.groups[0]
        if g.count == 1 and g.position is not None:
            return dataclasses.replace(scene, rotation=0.0,
                                       groups=(dataclasses.replace(g, centres=(world.POSITIONS[g.position],)),))


def _vae_crop(rng: random.Random, pools: list[dict], crop: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A crop of a rendered scene and the same crop of its :func:`world.shape_labels`."""
    pool = pools[0] if len(pools) == 1 or rng.random() < 0.9 else rng.choice(pools[1:])
    sizes = list(pool)
    w, h = rng.choices(sizes, weights=[BUCKETS.get(s, (1.0, 0))[0] for s in sizes])[0]
    images, scenes = pool[(w, h)]
    i = rng.randrange(len(scenes))
    img, scene = images[i], scenes[i]
    if rng.random() < 0.7:  # mostly around a shape: edges are what the VAE must learn
        cx, cy = rng.choice(rng.choice(scene.groups).centres)
        x = int(cx * w + rng.uniform(-0.6, 0.6) * crop) - crop // 2
        y = int(cy * h + rng.uniform(-0.6, 0.6) * crop) - crop // 2
    else:
        x, y = rng.randrange(w - crop + 1), rng.randrange(h - crop + 1)
    x, y = min(max(0, x), w - crop), min(max(0, y), h - crop)
    return img[y:y + crop, x:x + crop], world.shape_labels(scene, w, h)[y:y + crop, x:x + crop]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def shape_target(labels: list[np.ndarray]) -> torch.Tensor:
    """(B, len(SHAPES), h, w): for each shape, the share of each 32x32 patch it covers, times
    ``SHAPE_ANCHOR``: what the latents' shape channels hold (:func:`train_vae` says why)."""
    lab = torch.from_numpy(np.stack(labels)).long()
    onehot = F.one_hot(lab, len(world.SHAPES) + 1)[..., 1:].permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, VAE_FACTOR) * SHAPE_ANCHOR


def with_shapes(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``z`` with its shape channels replaced by ``target``."""
    return torch.cat([z[:, :SHAPE_CHANNELS.start], target, z[:, SHAPE_CHANNELS.stop:]], 1)


def train_vae(vae, pools: list[dict], plan: Plan, seed: int) -> dict:
    """Random 128x128 crops (mostly around a shape) of full-size renders, many small steps at a high
    learning rate. The loss is L1 + L2 reconstruction, plus terms that make the latents easy for
    the transformer: the first three channels follow the image's colour averaged over each 32x32
    patch (so a latent's colour *is* the picture's colour); the next four (:data:`SHAPE_CHANNELS`)
    follow :func:`shape_target`, which shape covers how much of the patch, and the decoder mostly
    (:data:`VAE_TEACHER`) decodes from the true shape channels, so it learns to draw the outline they
    name (without them a circle and a square at one place differed 5-10x less in the latents than a
    circle and a triangle, and the transformer drew one blob for both:
    bench/results/mini-shape-collapse-20261206.md); the decoder reconstructs from latents
    with a little noise added (so the imperfect latents a sampler ends with still decode cleanly);
    and the latents of the same crop moved by up to ``VAE_SHIFT`` pixels must stay the same (a latent
    pixel covers 32x32: without this term the pixel-shuffle VAE's latents change with every small
    shift, detail that varies between renders of one caption and that the transformer learned badly,
    bench/results/mini-dcae-full-run-20261206.md)."""
    rng = random.Random(seed + 1)
    torch.manual_seed(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    # 5% warm-up; at least two steps of it, or OneCycleLR divides by zero (a 20-step smoke run)
    warm = max(0.05, 2 / plan.vae_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=plan.vae_steps, pct_start=warm)
    vae.train()
    losses = []
    m, size = VAE_SHIFT, VAE_CROP
    for step in range(plan.vae_steps):
        big = [_vae_crop(rng, pools, crop=size + 2 * m) for _ in range(plan.vae_batch)]
        x = to_tensor([b[m:m + size, m:m + size] for b, _ in big])
        shapes = shape_target([lab[m:m + size, m:m + size] for _, lab in big])
        z = encode(vae, x)
        zd = with_shapes(z, shapes) if rng.random() < VAE_TEACHER else z
        y = vae.decode(zd + VAE_LATENT_NOISE * torch.randn_like(z)).sample
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        anchor = F.mse_loss(z[:, :3], F.avg_pool2d(x, VAE_FACTOR) * 1.5) + F.mse_loss(z[:, SHAPE_CHANNELS], shapes)
        dx, dy = rng.randint(-m, m), rng.randint(-m, m)
        moved = to_tensor([b[m + dy:m + dy + size, m + dx:m + dx + size] for b, _ in big])
        steady = F.mse_loss(encode(vae, moved), z)
        loss = rec + 0.5 * anchor + VAE_STEADY_WEIGHT * steady + 1e-3 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(rec.item())
        if step % 250 == 0 or step == plan.vae_steps - 1:
            log.info("vae %d/%d reconstruction loss %.4f", step, plan.vae_steps, float(np.mean(losses[-250:])))
    vae.eval()
    return {"class": type(vae).__name__, "final_loss": float(np.mean(losses[-100:]))}


@torch.no_grad()
def check_vae(vae, n: int, seed: int) -> dict:
    """Reconstruct ``n`` held-out 512x512 scenes and read them back with the quality checker: what the
    transformer can reach at best (a VAE that loses a shape's colour caps the whole model; the
    committed one reads back the right shape about four times in ten, the ceiling behind the model's
    blobs: bench/results/mini-defined-latents-20261206.md)."""
    rng = random.Random(seed + 7)
    right = {"background": 0, "colour": 0, "count": 0, "shape": 0, "shape_given": 0}
    errors = []
    for _ in range(n):
        scene = world.sample_scene(rng, held_out=True, two_groups=0.0)
        x = to_tensor([np.asarray(world.render(scene, 512, 512))])
        z = encode(vae, x)
        y = vae.decode(z).sample.clamp(-1, 1)
        errors.append((y - x).abs().mean().item())
        reading = world.classify(to_image(y[0]))
        group = scene.groups[0]
        right["background"] += reading.background == scene.background
        right["colour"] += reading.colour == group.colour
        right["count"] += reading.count == group.count
        right["shape"] += reading.shape == group.shape
        # decoded from the true shape channels, as the transformer learns them
        given = vae.decode(with_shapes(z, shape_target([world.shape_labels(scene, 512, 512)]))).sample.clamp(-1, 1)
        right["shape_given"] += world.classify(to_image(given[0])).shape == group.shape
    report = {k: round(v / n, 3) for k, v in right.items()}
    report["l1"] = round(float(np.mean(errors)), 4)
    log.info("vae check on %d held-out scenes: %s", n, report)
    return report


def to_image(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


@torch.no_grad()
def scene_latents(vae, image: np.ndarray, scene: world.Scene) -> torch.Tensor:
    """Raw latents of one render, its shape channels exactly the scene's (:func:`shape_target`)."""
    h, w = image.shape[:2]
    return with_shapes(encode(vae, to_tensor([image])), shape_target([world.shape_labels(scene, w, h)]))


@torch.no_grad()
def standardise(vae, images: np.ndarray, scenes: list) -> tuple[float, float]:
    """shift and scale that make the latents of (some) 512x512 renders zero-mean, unit-variance."""
    z = torch.cat([scene_latents(vae, image, scene) for image, scene in zip(images, scenes, strict=True)])
    mean, std = z.mean().item(), z.std().item()
    return mean, 1.0 / std


# --- stage 2: the latent dataset --------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(vae, rendered: dict) -> dict:
    """Per size: standardised latents (N, C, h, w) and their scenes."""
    cfg = vae.config
    out = {}
    for (w, h), (images, scenes) in rendered.items():
        # one picture a call: measured on this CPU, about 1.5x faster per picture than batches of eight
        # (channels-last weights: no faster, bench/results/mini-encode-channels-last-20261206.log)
        lat = [(scene_latents(vae, image, scene) - cfg.shift_factor) * cfg.scaling_factor
               for image, scene in zip(images, scenes, strict=True)]
        out[(w, h)] = (torch.cat(lat), scenes)
        log.info("encoded %d scenes at %dx%d", len(scenes), w, h)
    return out


# --- stage 3: transformer and text encoders ---------------------------------------------------------


class Conditioner:
    """Captions -> (T5 hidden states, pooled CLIP), exactly as FluxPipeline.encode_prompt computes them."""

    def __init__(self, clip_tok, t5_tok, clip, t5) -> None:
        self.clip_tok, self.t5_tok, self.clip, self.t5 = clip_tok, t5_tok, clip, t5

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.clip_tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        pooled = self.clip(c.input_ids, output_hidden_states=False).pooler_output
        t = self.t5_tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        return self.t5(t.input_ids, output_hidden_states=False)[0], pooled


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal (most weight mid-way, as SD3 trains) mixed with a quarter uniform (the ends too),
    then shifted toward noise by the sampler's own shift: where a picture's layout is decided, and
    where the scheduler spends most of its steps."""
    logit = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.25
    sigma = torch.where(pick, uniform, logit)
    sigma = SAMPLER_SHIFT * sigma / (1 + (SAMPLER_SHIFT - 1) * sigma)
    return sigma.clamp(1e-3, 1.0)


def flow_loss(transformer, cond: Conditioner, latents: torch.Tensor, captions: list[str],
              gen: torch.Generator) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    noise = torch.randn(latents.shape, generator=gen)
    sigma = sample_sigmas(b, gen)
    s = sigma.view(b, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    target = noise - latents
    hidden, pooled = cond(captions)
    pred = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
        encoder_hidden_states=hidden, pooled_projections=pooled, timestep=sigma,
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        txt_ids=torch.zeros(MAX_TOKENS, 3), return_dict=False,
    )[0]
    weight = FluxPipeline._pack_latents(shape_weight(latents).expand(b, c, h, w), b, c, h, w)
    return (weight * (pred - FluxPipeline._pack_latents(target, b, c, h, w)) ** 2).sum() / weight.sum()


def shape_weight(latents: torch.Tensor, extra: float = SHAPE_WEIGHT) -> torch.Tensor:
    """(B, 1, h, w) loss weights: 1 on the background, up to ``1 + extra`` where the clean latent is
    furthest from the background's (the per-image median, since the background covers most of it).
    Shapes are a few latent pixels of a mostly flat image: unweighted, the loss is nearly all
    background, and the model learns backgrounds long before it learns what the prompt put on them."""
    background = latents.flatten(2).median(dim=-1).values[..., None, None]
    distance = (latents - background).norm(dim=1, keepdim=True)
    return 1.0 + extra * distance / distance.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)


class Ema:
    def __init__(self, modules, decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


def _batch(data: dict, rng: random.Random, dropout: float, weights=None, *, canonical: bool = False):
    """A batch of one size bucket: latents and captions (varied templates, or ``canonical``: the one
    form :func:`world.prompt` writes, every attribute named), ``dropout`` of them empty."""
    sizes = list(data)
    size = rng.choices(sizes, weights=weights or [BUCKETS[s][0] for s in sizes])[0]
    latents, scenes = data[size]
    bs = min(BUCKETS.get(size, (0, 16))[1], len(scenes))
    idx = rng.sample(range(len(scenes)), bs)
    caption = (lambda scene: world.prompt(scene)) if canonical else (lambda scene: world.caption(scene, rng))
    captions = ["" if rng.random() < dropout else caption(scenes[i]) for i in idx]
    return latents[idx], captions


def learning_rate(step: int, focus_steps: int, total: int) -> float:
    """The transformer's learning rate, a fraction of ``TRANSFORMER_LR``: a warm-up and a cosine to zero
    over the focus steps (a 3000-step focus probe that ran its cosine out drew recognisable large
    shapes; bench/results/mini-shape-channels-20261206.md), then a second warm-up and cosine, from
    ``MIXTURE_LR`` of it, over the mixture steps, gentle enough to keep what the focus steps learned."""
    def phase(i: int, n: int, peak: float) -> float:
        warmup = min(100, n // 10 + 1)
        return peak * min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, n))))

    if focus_steps <= 0:  # no focus phase: one warm-up and cosine, from the full rate
        return phase(step, total, 1.0)
    if step < focus_steps:
        return phase(step, focus_steps, 1.0)
    return phase(step - focus_steps, total - focus_steps, MIXTURE_LR)


def train_transformer(transformer, cond: Conditioner, data: dict, plan: Plan, seed: int,
                      focus: dict | None = None) -> dict:
    """Train the transformer and both text encoders together, in three phases: the first
    ``plan.focus_steps`` on ``focus`` (one shape at a named position, captions in the canonical form),
    then the rest of ``plan.transformer_steps`` on the mixture, then ``plan.polish_steps`` of focus
    batches again with a share (``POLISH_MIXTURE``) from the mixture, from the EMA weights with a
    fresh optimiser at ``POLISH_LR``.

    Why the focus steps: on the mixture alone the model learned colours and never where to put things
    (the previous weights, 7000 steps: a shape's place was the noise's, and the T5 states of "top" and
    "bottom" were 0.91 cosine-alike while "red" and "green" were -0.03), since nothing tells an image
    token where it is but its rotary phase against the text tokens, all at position zero. Measured in
    short runs at 512 (a shape named at five places x four seeds, centroid within 0.2 of the place):
    1500 steps of canonical captions on single named-position shapes put it there 20 times in 20, and
    1500 more on the mixture kept 20 in 20; 1500 steps of the varied templates on the same scenes,
    or 2000 on the mixture alone, 4 in 20 (chance).

    Why the last phase: 3000 focus steps drew the shapes right 44% of the time (bench/mini_shapes.py),
    and the mixture steps after them, at any rate tried, wore that down to 30%; 800 more steps of
    focus alone brought them back to 40% but held-out shape colours fell to 75%, and with a quarter of
    mixture batches they came back to 37.5% with colours kept at 96.7%
    (bench/results/mini-focus-length-20261206.md)."""
    rng = random.Random(seed + 3)
    gen = torch.Generator().manual_seed(seed + 3)
    focus_steps = plan.focus_steps if focus is not None else 0

    def batch(step: int):
        focused = step < focus_steps
        return _batch(focus if focused else data, rng, dropout=0.1, canonical=focused)

    report = {"final_loss": _train_steps(transformer, cond, plan.transformer_steps, batch, gen,
                                         lambda step: learning_rate(step, focus_steps, plan.transformer_steps),
                                         "transformer")}
    if focus is None or plan.polish_steps <= 0:
        return report

    def polish_batch(step: int):
        if rng.random() < POLISH_MIXTURE:
            return _batch(data, rng, dropout=0.1)
        return _batch(focus, rng, dropout=0.1, canonical=True)

    report["polish_final_loss"] = _train_steps(
        transformer, cond, plan.polish_steps, polish_batch, gen,
        lambda step: POLISH_LR * learning_rate(step, 0, plan.polish_steps), "polish")
    return report


def _train_steps(transformer, cond: Conditioner, steps: int, batch, gen: torch.Generator, lr, name: str) -> float:
    """``steps`` optimiser steps on the transformer and both text encoders, ``batch(step)`` giving
    (latents, captions) and ``lr(step)`` the learning rate as a fraction of ``TRANSFORMER_LR``; ends
    with the weights set to their EMA. Returns the mean loss of the last 200 steps."""
    modules = [transformer, cond.clip, cond.t5]
    trainable = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(trainable, lr=TRANSFORMER_LR, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    ema = Ema(modules, 0.998)
    for m in modules:
        m.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        latents, captions = batch(step)
        loss = flow_loss(transformer, cond, latents, captions, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("%s %d/%d loss %.4f (%.0f s)", name, step, steps, float(np.mean(losses[-100:])),
                     time.perf_counter() - started)
    ema.copy_to()
    for m in modules:
        m.eval()
    return float(np.mean(losses[-200:]))


def train_lora(transformer, cond: Conditioner, data: dict, plan: Plan, seed: int, rank: int = 8) -> tuple[dict, dict]:
    """A LoRA on the transformer's attention projections: the same world, drawn in pastel colours."""
    from peft import LoraConfig, get_peft_model_state_dict

    rng = random.Random(seed + 4)
    gen = torch.Generator().manual_seed(seed + 4)
    torch.manual_seed(seed + 4)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                       "add_v_proj", "to_add_out"]))
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-3)
    transformer.train()
    losses = []
    for step in range(plan.lora_steps):
        latents, captions = _batch(data, rng, dropout=0.0, weights=[1.0])
        loss = flow_loss(transformer, _Frozen(cond), latents, captions, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == plan.lora_steps - 1:
            log.info("lora %d/%d loss %.4f", step, plan.lora_steps, float(np.mean(losses[-50:])))
    transformer.eval()
    return get_peft_model_state_dict(transformer), {"final_loss": float(np.mean(losses[-50:])), "rank": rank}


class _Frozen:
    def __init__(self, cond: Conditioner) -> None:
        self.cond = cond

    def __call__(self, captions):
        with torch.no_grad():
            return self.cond(captions)


# --- the whole run ----------------------------------------------------------------------------------


def train(out: Path, work: Path, *, seed: int = 0, scale: float = 1.0, from_stage: int = 1) -> dict:
    from diffusers import FluxPipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    plan = Plan.scaled(scale)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    report: dict = {"seed": seed, "scale": scale}
    t0 = time.perf_counter()

    clip_tok, t5_tok = tokenizers(seed)
    t = time.perf_counter()
    rendered = render_dataset(plan.images, seed + 10)
    pastel_rendered = render_dataset({(512, 512): plan.lora_images}, seed + 20, pastel=True)
    timings["render_s"] = time.perf_counter() - t
    torch.manual_seed(seed)
    vae = build_vae()
    vae_path = work / "vae.pt"
    if from_stage <= 1 or not vae_path.exists():
        t = time.perf_counter()
        report["vae"] = train_vae(vae, [rendered, pastel_rendered], plan, seed)
        timings["vae_s"] = time.perf_counter() - t
        torch.save({"state": vae.state_dict(), "report": report["vae"], "vae_s": timings["vae_s"]}, vae_path)
    else:  # the stage's own record comes along, so kiln_mini.json still says what the VAE took
        saved = torch.load(vae_path)
        vae.load_state_dict(saved["state"])
        report["vae"] = {**saved.get("report", {}), "reused": str(vae_path)}
        if "vae_s" in saved:
            timings["vae_s"] = saved["vae_s"]
    t = time.perf_counter()
    report["vae_check"] = check_vae(vae, 60 if scale >= 0.5 else 4, seed)
    shift, scaling = standardise(vae, rendered[(512, 512)][0][:96], rendered[(512, 512)][1][:96])
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    timings["vae_check_s"] = time.perf_counter() - t
    vae.eval()

    t = time.perf_counter()
    data = encode_dataset(vae, rendered)
    pastel = encode_dataset(vae, pastel_rendered)
    focus = encode_dataset(vae, render_dataset({(512, 512): plan.focus_images}, seed + 30, focus=True))
    del rendered, pastel_rendered
    timings["encode_s"] = time.perf_counter() - t

    torch.manual_seed(seed + 5)
    clip, t5 = build_text(clip_tok, t5_tok)
    transformer = build_transformer()
    cond = Conditioner(clip_tok, t5_tok, clip, t5)
    t = time.perf_counter()
    report["transformer"] = train_transformer(transformer, cond, data, plan, seed, focus=focus)
    timings["transformer_s"] = time.perf_counter() - t

    pipe = FluxPipeline(scheduler=build_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    out.mkdir(parents=True, exist_ok=True)
    report["parameters"] = {"transformer": params(transformer), "vae": params(vae), "clip": params(clip),
                            "t5": params(t5)}
    report["parameters"]["total"] = sum(report["parameters"].values())

    t = time.perf_counter()
    lora_transformer = copy.deepcopy(transformer)
    lora_state, report["lora"] = train_lora(lora_transformer, cond, pastel, plan, seed)
    timings["lora_s"] = time.perf_counter() - t

    save(pipe, out)
    FluxPipeline.save_lora_weights(out / "lora" / "pastel", transformer_lora_layers=_half(lora_state),
                                   weight_name="pastel.safetensors")
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    report["plan"] = {"vae_steps": plan.vae_steps,
                      "transformer_steps": plan.transformer_steps, "focus_steps": plan.focus_steps,
                      "polish_steps": plan.polish_steps,
                      "focus_images": plan.focus_images,
                      "images": {f"{w}x{h}": n for (w, h), n in plan.images.items()},
                      "lora_images": plan.lora_images, "lora_steps": plan.lora_steps}
    report["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    (out / "kiln_mini.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("done in %.0f s: %s", timings["total_s"], json.dumps(report["timings"]))
    return report


def _half(state: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def save(pipe, out: Path) -> None:
    """The pipeline with float16 weights (half the bytes; a CPU loads them back as float32)."""
    half = copy.deepcopy(pipe)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(half, name).to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the pipeline directory to write")
    ap.add_argument("--work", type=Path, default=None, help="intermediate files (default OUT.work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every stage (0.05: a smoke run)")
    ap.add_argument("--from-stage", type=int, default=1, help="2: reuse the VAE in --work")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    train(args.out, args.work or args.out.with_name(args.out.name + ".work"), seed=args.seed, scale=args.scale,
          from_stage=args.from_stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
