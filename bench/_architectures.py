"""FLUX.1-schnell, FLUX.1-dev and Z-Image-Turbo at their published sizes, with random weights.

Weights cannot be downloaded here, and for a lossless optimisation the work is the same whatever the
weights are: ``build`` constructs each pipeline from the published component configurations (full
size) or from toy ones of the same architecture (``--toy``: the identical code path on a CPU in
seconds), seeded, and saves it as a diffusers checkpoint that Kiln loads through its normal catalog
path.

Published configurations (the ``config.json`` of each component on the Hugging Face hub):

- FLUX.1 transformer (black-forest-labs/FLUX.1-dev and -schnell, ``transformer/config.json``):
  attention_head_dim 128, num_attention_heads 24 (3072 wide), num_layers 19 (double-stream),
  num_single_layers 38, in_channels 64, patch_size 1, joint_attention_dim 4096,
  pooled_projection_dim 768, axes_dims_rope [16, 56, 56]; guidance_embeds true for dev, false for
  schnell.
- FLUX.1 text encoders: CLIP-L's text tower (``text_encoder``: hidden 768, 12 layers, 12 heads,
  intermediate 3072, 77 positions, vocabulary 49408, quick_gelu) and the T5 v1.1 XXL encoder
  (``text_encoder_2``: d_model 4096, d_ff 10240, d_kv 64, 64 heads, 24 layers, vocabulary 32128,
  gated-gelu, 32 relative-attention buckets up to distance 128).
- FLUX.1 VAE (``vae/config.json``, also Z-Image's): AutoencoderKL, block_out_channels
  [128, 256, 512, 512], layers_per_block 2, 16 latent channels, 32 norm groups, scaling_factor 0.3611,
  shift_factor 0.1159, no quant convs.
- Schedulers: schnell FlowMatchEuler with shift 1.0 and no dynamic shifting; dev dynamic shifting
  (base_shift 0.5, max_shift 1.15 between 256 and 4096 image tokens); Z-Image-Turbo a static shift 3.0.
- Z-Image-Turbo transformer (Tongyi-MAI/Z-Image-Turbo ``transformer/config.json``): dim 3840, 30 layers
  + 2 refiner layers, 30 heads (30 KV heads), cap_feat_dim 2560, in_channels 16, patch 2, qk_norm,
  rope_theta 256, t_scale 1000, axes_dims [32, 48, 48], axes_lens [1536, 512, 512], norm_eps 1e-5; its
  text encoder is Qwen3-4B's base model (``text_encoder``: hidden 2560, 36 layers, 32 heads, 8 KV
  heads, head_dim 128, intermediate 9728, vocabulary 151936, rope_theta 1e6, rms_norm_eps 1e-6).

Tokenizers are Kiln's toy ones (:mod:`kiln.testing.toys`, trained on a small caption corpus): the
encoders' vocabularies keep their published sizes (an embedding lookup costs the same), T5 and CLIP
pad to their fixed lengths as the real ones do, and only Z-Image's caption length (its tokens are not
padded) can differ by a few tokens from what the real Qwen tokenizer gives for the same prompt.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)

# The same architectures at toy size (as kiln.testing.toys builds them): seconds on a CPU.
TOY = {
    "flux_transformer": dict(FLUX_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 6, 6)),
    "clip": dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32),
    "t5": dict(T5_XXL, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2),
    "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
    "zimage_transformer": dict(ZIMAGE_TRANSFORMER, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                               cap_feat_dim=32, axes_dims=[8, 4, 4], axes_lens=[1024, 512, 512]),
    "qwen": dict(QWEN3_4B, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16),
}

MODELS = ("schnell", "dev", "zimage")
# The catalog entry each bench model stands in for.
CATALOG_KEY = {"schnell": "flux/schnell", "dev": "flux/dev", "zimage": "zimage/turbo", "mini": "flux/mini"}


@contextlib.contextmanager
def _creating(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters are made on ``device`` in ``dtype`` directly: a 12B transformer made in float32 on
    the host would need 48 GB and minutes of initialisation."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build(name: str, out_dir: Path, *, toy: bool, device: torch.device, dtype: torch.dtype) -> Path:
    """Build bench model ``name`` (schnell, dev, zimage) and save it as a diffusers checkpoint in
    ``out_dir/name``; return that path."""
    path = Path(out_dir) / name
    with _creating(device, dtype):
        pipe = _flux(name == "dev", toy) if name in ("schnell", "dev") else _zimage(toy)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path


def _vae(toy: bool) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", latent_channels=16, sample_size=1024,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True, **(TOY["vae"] if toy else FLUX_VAE),
    )


def _flux(dev: bool, toy: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from kiln.testing.toys import clip_tokenizer, t5_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer(model_max_length=512)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **(TOY["clip"] if toy else CLIP_L), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(
        **(TOY["t5"] if toy else T5_XXL), tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    ))
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**(TOY["flux_transformer"] if toy else FLUX_TRANSFORMER), guidance_embeds=dev)
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(toy), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _zimage(toy: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from kiln.testing.toys import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(
        **(TOY["qwen"] if toy else QWEN3_4B), bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**(TOY["zimage_transformer"] if toy else ZIMAGE_TRANSFORMER))
    with torch.no_grad():  # created with torch.empty: give them values
        for name in ("x_pad_token", "cap_pad_token"):
            param = getattr(transformer, name, None)
            if param is not None:
                noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(0), device="cpu")
                param.copy_(noise * 0.02)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=_vae(toy), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def transformer_flops(name: str, width: int, height: int, text_tokens: int) -> int:
    """FLOPs of one transformer call at full size for a ``width`` x ``height`` image and ``text_tokens``
    of prompt (FLUX: its padded T5 length; Z-Image: its caption's tokens), counted by
    ``torch.utils.flop_counter`` on the meta device: no memory, no GPU, seconds."""
    from diffusers import FluxTransformer2DModel, ZImageTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with _creating(torch.device("meta"), torch.bfloat16), FlopCounterMode(display=False) as counter:
        if name in ("schnell", "dev"):
            model = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=name == "dev")
            tokens = (height // 16) * (width // 16)  # VAE 8x, then 2x2 packing
            model(
                hidden_states=torch.empty(1, tokens, 64), encoder_hidden_states=torch.empty(1, text_tokens, 4096),
                pooled_projections=torch.empty(1, 768), timestep=torch.ones(1), img_ids=torch.zeros(tokens, 3),
                txt_ids=torch.zeros(text_tokens, 3), guidance=torch.ones(1) if name == "dev" else None,
                return_dict=False,
            )
        else:
            model = ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER)
            model([torch.empty(16, 1, height // 8, width // 8)], torch.ones(1), [torch.empty(text_tokens, 2560)],
                  return_dict=False)
    return counter.get_total_flops()


def caption_tokens(prompt: str) -> int:
    """Z-Image's caption length for ``prompt``: its chat template, tokenized (Kiln's toy Qwen tokenizer;
    the real one may differ by a few tokens)."""
    from kiln.testing.toys import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    return len(tokenizer(text).input_ids)

