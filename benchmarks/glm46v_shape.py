"""GLM-4.6V-Flash's shape without its weights: config, processor and tokenizer.

    python benchmarks/glm46v_shape.py checkpoints/glm-4.6v-flash-shape [--tiny]

writes a checkpoint directory with no weights, which `configs/models/glm-4.6v-flash-dummy.yaml`
serves with `load_format: dummy` (random weights made on the GPU at load), so the whole Ray
application can be benchmarked at the production model's size on a machine that cannot download
it. The shape is transformers' default `Glm46VConfig` (10.3B parameters: 40 layers, hidden 4096,
32 query / 2 key-value heads, vocabulary 151,552), as ../shared/probes/hfbase.py measured it; the
tokenizer is the demo model's (same special tokens and chat template) and the image processor is
GLM-4.6V's default (448x448 -> 256 image tokens). `--tiny` shrinks it to hfbase.py's CPU size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def glm46v_shape(tiny: bool = False):
    """(config, processor, generation_config) of the GLM-4.6V-Flash shape."""
    import transformers as t

    from demo.model import CHAT_TEMPLATE, EOS_TOKENS, build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = t.Glm46VConfig()
    _fill_vocabulary(tokenizer, config.text_config.vocab_size)
    if tiny:  # hfbase.py --tiny
        config.text_config.update({"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 256,
                                   "num_attention_heads": 2, "num_key_value_heads": 1})
        config.vision_config.update({"hidden_size": 64, "depth": 2, "intermediate_size": 128, "num_heads": 4,
                                     "out_hidden_size": 256})
    config.text_config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default",
                                          "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}
    # Special tokens as the demo tokenizer numbers them (the vocabulary stays 151,552 wide).
    config.image_token_id, config.video_token_id = ids("<|image|>"), ids("<|video|>")
    config.image_start_token_id, config.image_end_token_id = ids("<|begin_of_image|>"), ids("<|end_of_image|>")
    config.video_start_token_id, config.video_end_token_id = ids("<|begin_of_video|>"), ids("<|end_of_video|>")
    config.text_config.pad_token_id = ids("<|endoftext|>")
    generation = t.GenerationConfig(
        eos_token_id=[ids(name) for name in EOS_TOKENS], pad_token_id=ids("<|endoftext|>"), do_sample=False
    )
    processor = t.Glm46VProcessor(
        image_processor=t.Glm46VImageProcessor(), tokenizer=tokenizer,
        video_processor=t.Glm46VVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )
    return config, processor, generation


def _fill_vocabulary(tokenizer, size: int) -> None:
    """Give every id the model can emit a text, so random weights stream visible tokens.

    The demo tokenizer knows ~1,000 tokens and GLM's vocabulary is 151,552 wide: most tokens a
    random model picks would decode to nothing, and a client would never see its first token. The
    filler entries (" t1021", " t1022", ...) have no merges, so prompts encode exactly as before.
    """
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    used = set(vocab.values()) | {token["id"] for token in state["added_tokens"]}
    for token_id in range(size):
        if token_id not in used:
            vocab[f"\u0120t{token_id}"] = token_id  # U+0120 is byte-level BPE's space
    # PreTrainedTokenizerFast keeps its tokenizers.Tokenizer here; swapping it keeps every other setting.
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


def save_shape(out: Path, tiny: bool = False) -> None:
    config, processor, generation = glm46v_shape(tiny)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    generation.save_pretrained(out)
    processor.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--tiny", action="store_true", help="hfbase.py's CPU size (0.08B parameters)")
    args = parser.parse_args(argv)
    save_shape(args.out, args.tiny)
    print(f"wrote {args.out} (config, processor, tokenizer; no weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
