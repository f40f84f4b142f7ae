"""Builds the embedded demo checkpoint: a tiny GLM-4.6V-architecture model made offline.

The checkpoint has the same classes, processor, special tokens and chat-template format as
`zai-org/GLM-4.6V-Flash` (model_type `glm4v`, `Glm46VProcessor`), so the server loads it through
exactly the code path that loads the production model: `AutoProcessor` and
`AutoModelForImageTextToText.from_pretrained` on a directory written by `save_pretrained`.

Everything is seeded: building twice gives byte-identical weights and the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm46VImageProcessor,
    Glm46VProcessor,
    PreTrainedTokenizerFast,
)

from demo.vqa_data import vocabulary_corpus

# GLM-4.6V's special tokens, in the order the real tokenizer lists them. Ids are whatever our
# tokenizer assigns: the server always reads them from the tokenizer, never from constants.
SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|pad|>",
]
# The turn markers that end an assistant answer, as in GLM-4.6V's generation_config.
EOS_TOKENS: list[str] = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# GLM-4.5V/4.6V chat format with thinking off: `/nothink` closes each user turn and every
# assistant turn opens with an empty `<think></think>`.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' }}"
    "{%- else -%}{{ '<|assistant|>\\n<think></think>\\n' }}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'user' -%}{{ '/nothink' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n<think></think>\\n' }}{%- endif -%}"
)

# A small built-in corpus so the byte-level BPE learns merges for the words the demo uses
# (English and Chinese), keeping prompts short. Bytes cover anything else.
DEFAULT_CORPUS: tuple[str, ...] = (
    "What shape is this? What color is the square? How many circles are there?",
    "What word is written? Describe the image. The image shows a red circle and a blue square.",
    "There are three circles. The shape is a triangle. The word is HELLO. The digit is 7.",
    "circle square triangle star red green blue yellow orange purple black white gray pink",
    "left right top bottom center one two three four five six seven eight nine zero",
    "图里有几个圆? 这是什么形状? 正方形是什么颜色? 图中写的是什么字? 图里有三个圆。",
    "圆形 正方形 三角形 星形 红色 绿色 蓝色 黄色 橙色 紫色 黑色 白色 灰色 粉色",
    "Hello! You are a helpful assistant. Answer the question about the picture briefly.",
    # Every phrasing and answer of the synthetic VQA set the demo model is trained on, so its
    # prompts and answers are a few tokens each (see demo/vqa_data.py).
    *vocabulary_corpus(),
)


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE (the same family as GLM's tokenizer) trained on `corpus`, with GLM's specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    layers: int = 2,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    vision_intermediate_size: int | None = None,
) -> Glm4vConfig:
    """A GLM-4.6V-Flash-shaped config scaled down to a few MB of weights.

    The defaults give the random plumbing model; the trained demo model (configs/train/demo.yaml)
    passes larger sizes. Intermediate sizes default to twice the hidden size.
    """
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    head_dim = hidden_size // heads
    # Multimodal RoPE rotates half of each head (partial_rotary_factor 0.5) and splits the rotated
    # pairs over (time, height, width): the three sections sum to head_dim / 4.
    quarter = head_dim // 4
    mrope_section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    return Glm4vConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": mrope_section,
            },
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids[t] for t in EOS_TOKENS],
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_intermediate_size or vision_hidden_size * 2,
            "num_heads": vision_heads,
            "image_size": 224,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, max_side: int = 224) -> Glm46VProcessor:
    """GLM-4.6V's processor with the image budget capped at `max_side`^2 pixels (64 image tokens)."""
    image_processor = Glm46VImageProcessor(
        # GLM counts pixels over two temporal copies of an image, hence the factor 2.
        size={"shortest_edge": 2 * 28 * 28, "longest_edge": 2 * max_side * max_side},
    )
    from transformers import Glm46VVideoProcessor  # imported late: it needs torchvision

    return Glm46VProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Glm46VVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_model(config: Glm4vConfig, seed: int = 0) -> Glm4vForConditionalGeneration:
    """A seeded randomly initialised model with GLM-4.6V's greedy generation config."""
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    return model


def make_demo_model(out_dir: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write a seeded random demo checkpoint (model, processor, tokenizer) to `out_dir`.

    `sizes` are passed to `build_config` (hidden_size, layers, vision_depth, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(build_config(tokenizer, **sizes), seed).eval()
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    return out
