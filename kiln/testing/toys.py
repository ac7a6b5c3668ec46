"""Toy-size checkpoints of the real diffusers architectures kiln serves, built fully offline.

Each toy is a complete diffusers-format checkpoint folder (``model_index.json`` plus one sub-folder per component,
written by ``save_pretrained``) with the same pipeline class, component classes, scheduler configuration and
latent geometry as the real model, but with 1-2 layer, 16-32 wide networks and tokenizers trained on a small
built-in caption corpus (:mod:`kiln.testing.corpus`). Tests load them exactly as a real checkpoint is loaded::

    pipe = DiffusionPipeline.from_pretrained(build_toys(tmp)["flux1-dev"])

Weights are random (seeded, so builds are deterministic): outputs are noise of the right shape, dtype and range.

=================  =======================================================================================
name               mirrors
=================  =======================================================================================
``flux1-dev``      black-forest-labs/FLUX.1-dev: FluxPipeline, CLIP + T5 text encoders, guidance_embeds=True
``flux1-schnell``  black-forest-labs/FLUX.1-schnell: as above with guidance_embeds=False, static shift 1.0
``flux2-dev``      black-forest-labs/FLUX.2-dev: Flux2Pipeline, Mistral3ForConditionalGeneration (40 layers)
``zimage-turbo``   Tongyi-MAI/Z-Image-Turbo: ZImagePipeline, Qwen3Model text encoder, FLUX.1 VAE
``wan22-ti2v``     Wan-AI/Wan2.2-TI2V-5B-Diffusers: WanPipeline(expand_timesteps=True), Wan 2.2 VAE, UMT5
=================  =======================================================================================

Known deviation: FLUX.2's real ``tokenizer`` component is a ``PixtralProcessor``. transformers 5.x refuses to
import that class without torchvision, which cannot be installed next to a CPU-only torch from PyPI, so the toy's
``model_index.json`` names ``PreTrainedTokenizerFast`` (the tokenizer the processor wraps; it offers the same
``apply_chat_template`` call that Flux2Pipeline makes) while the folder also carries the processor's
``processor_config.json`` / ``preprocessor_config.json`` so ``AutoProcessor`` works wherever torchvision does.

CLI: ``python -m kiln.testing.toys DIR [--force] [--only NAME ...]`` builds the toys and prints ``name -> path``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kiln.testing.corpus import captions

__all__ = ["TOY_NAMES", "TOY_FORMAT", "MARKER_FILE", "build_toys", "build_toy", "is_complete", "main"]

#: Version of the checkpoint layout. Existing builds are also rebuilt whenever this module or the caption corpus
#: changes (their source digest is recorded in the marker file).
TOY_FORMAT = 1
#: Written last into each checkpoint folder; a folder without it (or from other toy code) is rebuilt.
MARKER_FILE = "kiln_toy.json"
TOY_NAMES = ("flux1-dev", "flux1-schnell", "flux2-dev", "zimage-turbo", "wan22-ti2v")

SEED = 0

# --------------------------------------------------------------------------------------------------------------
# Tokenizers (trained offline on the caption corpus)
# --------------------------------------------------------------------------------------------------------------

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Tekken (Mistral) pre-tokenization regex.
_TEKKEN_SPLIT = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"""
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"""
    r"""\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The first control tokens of Mistral's tekken vocabulary, at their real ids ([IMG] = 10 = image_token_index).
_MISTRAL_CONTROL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip

# A compact form of Qwen3's chat template: the parts ZImagePipeline exercises (user/system/assistant turns,
# add_generation_prompt, enable_thinking=False inserting an empty think block).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral Small 3.x chat template shape: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST], [IMG] per image block.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if system_message is not none %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{%- if message['content'] is string %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{{- message['content'][0]['text'] }}{%- endif %}{{- eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _corpus(extra: Iterable[str] = ()) -> list[str]:
    return captions() + list(extra)


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols in GPT-2 ``bytes_to_unicode`` order (= code point order)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _train_bpe(
    texts: list[str],
    *,
    pre_tokenizer: Any,
    normalizer: Any = None,
    vocab_size: int = 1024,
    suffix: str = "",
    head: Iterable[str] = (),
    tail: Iterable[str] = (),
    min_frequency: int = 2,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges on ``texts``; return ``(vocab, merges)`` for a ``tokenizers`` BPE model.

    Text is split with the target tokenizer's own ``tokenizers`` normalizer and pre-tokenizer; merges are then
    learned here rather than with ``tokenizers.trainers.BpeTrainer``, whose tie-breaking between equally frequent
    pairs follows hash-map order and so changes from process to process. Ties go to the lexicographically
    smallest pair, which makes the result identical on every run. Ids follow the real CLIP/GPT-2/tekken layout:
    ``head`` tokens, the 256 byte symbols (plus byte + ``suffix`` when words end with a suffix), merge results in
    merge order, then ``tail`` tokens.
    """
    import heapq
    from collections import Counter

    head, tail = list(head), list(tail)
    word_counts: Counter[str] = Counter()
    for text in texts:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        word_counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    words: list[list[str]] = []
    counts: list[int] = []
    for word, count in sorted(word_counts.items()):
        symbols = list(word)
        if suffix:
            symbols[-1] += suffix
        words.append(symbols)
        counts.append(count)

    alphabet = _byte_alphabet()
    base = head + alphabet + ([c + suffix for c in alphabet] if suffix else []) + tail
    num_merges = max(0, vocab_size - len(set(base)))

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            symbols, count = words[i], counts[i]
            for old in zip(symbols, symbols[1:]):
                pair_counts[old] -= count
                touched.add(old)
            j, out = 0, []
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for new in zip(out, out[1:]):
                pair_counts[new] += count
                where.setdefault(new, set()).add(i)
                touched.add(new)
        pair_counts.pop(pair, None)
        for p in touched:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)

    vocab: dict[str, int] = {}
    for token in head + alphabet + ([c + suffix for c in alphabet] if suffix else []):
        vocab.setdefault(token, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in tail:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def clip_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = 1024, model_max_length: int = 77):
    """CLIP byte-level BPE (``</w>`` word suffix, lower-cased), as ``CLIPTokenizer``, learned on ``corpus``
    (default: the toy captions)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    vocab, merges = _train_bpe(
        _corpus() if corpus is None else list(corpus),
        vocab_size=vocab_size,
        normalizer=normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        ),
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        ),
        suffix="</w>",
        tail=["<|startoftext|>", "<|endoftext|>"],  # last ids, as in the real vocabulary (49406, 49407)
    )
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(corpus: Iterable[str] | None = None, *, model_max_length: int = 512, extra_ids: int = 100,
                 vocab_size: int = 1024):
    """T5/UMT5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, sentinels last), as ``T5Tokenizer``,
    learned on ``corpus`` (default: the toy captions)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import Unigram
    from transformers import T5Tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", max_piece_length=16, show_progress=False
    )
    tok.train_from_iterator(_corpus() if corpus is None else list(corpus), trainer)
    # The trainer's piece order and the tiny score offsets it gives "required" characters follow hash-map order;
    # rounding the scores and sorting makes the vocabulary identical from run to run.
    trained = [(str(p), round(float(s), 2)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    pieces = [(p, 0.0) for p in specials]
    pieces += sorted((ps for ps in trained if ps[0] not in specials), key=lambda ps: (-ps[1], ps[0]))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=model_max_length)


def qwen_tokenizer():
    """Qwen byte-level BPE with Qwen3's special tokens and chat template, as ``Qwen2Tokenizer``."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(
        _corpus(),
        normalizer=normalizers.NFC(),
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        tail=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    qwen = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=40960,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    qwen.add_tokens([AddedToken("<|im_start|>", special=True, normalized=False)])
    qwen.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return qwen


def mistral_tokenizer():
    """Tekken-style byte-level BPE with Mistral's control tokens and chat template, as ``PreTrainedTokenizerFast``.

    The FLUX.2 system prompts are part of the training text so the (always present) system message tokenizes
    into a few hundred tokens rather than thousands of bytes, as it does with the real 131k vocabulary.
    """
    from diffusers.pipelines.flux2 import system_messages
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_TEKKEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    system_texts = sorted(getattr(system_messages, n) for n in dir(system_messages) if n.startswith("SYSTEM_MESSAGE"))
    vocab, merges = _train_bpe(
        _corpus(system_texts * 2),
        pre_tokenizer=pre_tokenizer,
        vocab_size=2048,
        head=list(_MISTRAL_CONTROL_TOKENS),
    )
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _MISTRAL_CONTROL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=131072,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------------------------
# Shared components
# --------------------------------------------------------------------------------------------------------------


def _t5_encoder_config(tokenizer: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide T5 encoder (FLUX.1's T5 and WAN's UMT5 share the shape)."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _flux_vae():
    """FLUX.1's AutoencoderKL (also Z-Image's): 4 levels -> vae_scale_factor 8, 16 latent channels, no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _flux_dev_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # black-forest-labs/FLUX.1-dev scheduler_config.json (FLUX.2-dev ships the same one).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# --------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------


def _flux1(guidance_embeds: bool):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer(model_max_length=512)

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(SEED)
    text_encoder_2 = T5EncoderModel(
        T5Config(**_t5_encoder_config(tokenizer_2))
    )
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = T5 d_model
        pooled_projection_dim=32,  # = CLIP hidden size
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(SEED)
    vae = _flux_vae()
    if guidance_embeds:
        scheduler = _flux_dev_scheduler()
    else:  # black-forest-labs/FLUX.1-schnell: static shift 1.0
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=False,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _flux2_dev():
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = mistral_tokenizer()
    text_hidden = 16
    torch.manual_seed(SEED)
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config={
                "model_type": "mistral",
                "vocab_size": len(tokenizer),
                "hidden_size": text_hidden,
                "intermediate_size": 32,
                # 40 layers like Mistral-Small-3.x, so the pipeline's default text_encoder_out_layers=(10, 20, 30)
                # index real intermediate hidden states.
                "num_hidden_layers": 40,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 8,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1000000000.0,
                "sliding_window": None,
                "tie_word_embeddings": False,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "model_type": "pixtral",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "head_dim": 8,
                "image_size": 1540,
                "patch_size": 14,
                "num_channels": 3,
            },
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=2,
            projector_hidden_act="gelu",
            multimodal_projector_bias=False,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    )
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patchify, as the real model
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_hidden,  # three stacked Mistral hidden states
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=True,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=1024,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        batch_norm_eps=1e-4,
        patch_size=(2, 2),
    )
    return Flux2Pipeline(
        scheduler=_flux_dev_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _flux2_finish(path: Path, pipe: Any) -> None:
    """Write the PixtralProcessor configs next to the tokenizer and name a loadable tokenizer class."""
    tok_dir = path / "tokenizer"
    vision = pipe.text_encoder.config.vision_config
    processor_config = {
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
        "image_token": "[IMG]",
        "patch_size": vision.patch_size,
        "processor_class": "PixtralProcessor",
        "spatial_merge_size": pipe.text_encoder.config.spatial_merge_size,
    }
    (tok_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    preprocessor_config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "PixtralImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": vision.patch_size,
        "processor_class": "PixtralProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": vision.image_size},
    }
    (tok_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config, indent=2, sort_keys=True) + "\n"
    )
    # transformers 5 writes its internal class name "TokenizersBackend"; "PreTrainedTokenizerFast" is the public
    # alias that transformers 4.x and 5.x both resolve.
    _patch_json(path / "model_index.json", lambda d: d.update(tokenizer=["transformers", "PreTrainedTokenizerFast"]))
    _patch_json(tok_dir / "tokenizer_config.json", lambda d: d.update(tokenizer_class="PreTrainedTokenizerFast"))


def _zimage_turbo():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,  # the pipeline reads hidden_states[-2]
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=32,  # = Qwen3 hidden size
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 512, 512],
    )
    # The pad tokens are created with torch.empty: give them deterministic values.
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            param = getattr(transformer, name, None)
            if param is not None:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(SEED)) * 0.02)
    torch.manual_seed(SEED)
    vae = _flux_vae()
    # Tongyi-MAI/Z-Image-Turbo scheduler_config.json: static shift 3.0.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


# Wan 2.2 VAE per-channel latent statistics (diffusers scripts/convert_wan_to_diffusers.py, vae22 config).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip


def _wan22_ti2v():
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer(model_max_length=512)
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(
        UMT5Config(**_t5_encoder_config(tokenizer))
    )
    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=48,  # Wan 2.2 VAE z_dim; no image-condition channels (TI2V conditions by latent replacement)
        out_channels=48,
        text_dim=32,  # = UMT5 d_model
        freq_dim=256,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLWan(
        # 4 wide, no extra resnets: the decoder runs 3D convs at full frame size and dominates CPU time
        # (832x480, 5 frames: ~0.6 s to decode on 2 cores).
        base_dim=4,
        decoder_base_dim=4,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=WAN22_LATENTS_MEAN,
        latents_std=WAN22_LATENTS_STD,
        is_residual=True,
        in_channels=12,  # 3 x 2x2 pixel patchify
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
    )
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers scheduler_config.json.
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=True,
    )


_BUILDERS: dict[str, tuple[Callable[[], Any], Callable[[Path, Any], None] | None]] = {
    "flux1-dev": (lambda: _flux1(guidance_embeds=True), None),
    "flux1-schnell": (lambda: _flux1(guidance_embeds=False), None),
    "flux2-dev": (_flux2_dev, _flux2_finish),
    "zimage-turbo": (_zimage_turbo, None),
    "wan22-ti2v": (_wan22_ti2v, None),
}


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def _patch_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _source_digest() -> str:
    """Fingerprint of the code that defines the toys: an edit to it makes existing builds stale."""
    import hashlib

    from kiln.testing import corpus

    digest = hashlib.sha256()
    for module_file in (__file__, corpus.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


def is_complete(path: str | Path, name: str | None = None) -> bool:
    """True if ``path`` holds a finished build of the current toy code (and of toy ``name``, if given)."""
    marker = Path(path) / MARKER_FILE
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        data.get("format") == TOY_FORMAT
        and data.get("source") == _source_digest()
        and (name is None or data.get("name") == name)
    )


def _install(tmp: Path, final: Path, name: str, *, force: bool) -> None:
    """Move a finished build into place; safe when several processes build the same toy at once."""
    if not force and is_complete(final, name):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=final.parent))
        try:
            os.replace(final, trash / name)
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_complete(final, name):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_toy(name: str, out_dir: str | Path, *, force: bool = False) -> Path:
    """Build the toy checkpoint ``name`` at ``out_dir/name`` (skipped if already complete unless ``force``)."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown toy {name!r}; known: {', '.join(TOY_NAMES)}")
    out_dir = Path(out_dir)
    final = out_dir / name
    if not force and is_complete(final, name):
        return final

    import torch
    import diffusers
    import transformers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    out_dir.mkdir(parents=True, exist_ok=True)
    build, finish = _BUILDERS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
    d_level, t_level = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    t_bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        # Keep the caller's global RNG state untouched; every component is seeded explicitly.
        with torch.random.fork_rng(devices=[]):
            pipe = build()
            pipe.save_pretrained(tmp, safe_serialization=True)
        if finish is not None:
            finish(tmp, pipe)
        marker = {
            "name": name,
            "format": TOY_FORMAT,
            "pipeline": type(pipe).__name__,
            "seed": SEED,
            "source": _source_digest(),
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install(tmp, final, name, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        diffusers_logging.set_verbosity(d_level)
        transformers_logging.set_verbosity(t_level)
        if t_bars:
            transformers_logging.enable_progress_bar()
    return final


def build_toys(out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Build every toy checkpoint under out_dir (idempotent: skip ones already complete unless force).

    Return {name: path}.
    """
    return {name: build_toy(name, out_dir, force=force) for name in TOY_NAMES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.testing.toys", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to build the toy checkpoints in")
    parser.add_argument("--force", action="store_true", help="rebuild toys that are already complete")
    parser.add_argument("--only", nargs="+", choices=TOY_NAMES, metavar="NAME", help="build only these toys")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in args.only or TOY_NAMES:
        path = build_toy(name, args.out_dir, force=args.force)
        print(f"{name} -> {path}")
    if not args.only:
        from kiln.testing.catalog import write_toy_catalog

        print(f"catalog -> {write_toy_catalog(args.out_dir)}  (use: kiln --catalog {args.out_dir}/catalog.toml ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
