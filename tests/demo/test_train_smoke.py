"""Training the demo model: serving-identical inputs, the CPU smoke run, resume, config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from demo import train as train_demo
from demo.model import build_config, build_model, build_processor, build_tokenizer
from demo.train import (
    SMOKE_CONFIG,
    PromptStyle,
    RopeIndexer,
    TrainBatches,
    batched_vision_attention,
    build_prompt,
    encode_batch,
    load_config,
    pack_pixels,
    train,
    unpack_pixels,
)
from demo.vqa_data import generate, make_sample

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def processor():  # type: ignore[no-untyped-def]
    return build_processor(build_tokenizer())


def test_prompt_is_the_serving_chat_template(processor) -> None:  # type: ignore[no-untyped-def]
    prompt = build_prompt(processor, "What shape is this?")
    assert prompt == (
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>What shape is this?/nothink"
        "<|assistant|>\n<think></think>\n"
    )
    text_first = build_prompt(processor, "Q?", PromptStyle(image_first=False, system="Be brief."))
    assert text_first.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nQ?<|begin_of_image|>")


def test_labels_cover_exactly_the_answer_and_eos(processor) -> None:  # type: ignore[no-untyped-def]
    samples = generate("train", 6)
    styles = [PromptStyle(image_first=i % 2 == 0) for i in range(6)]
    batch = encode_batch(processor, samples, styles)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "labels",
    }
    pad = processor.tokenizer.pad_token_id
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(labelled) == sample.answer + "<|endoftext|>"
        assert batch["attention_mask"][row][0] == 0 or batch["input_ids"][row][0] != pad  # padded on the left


def test_pixel_packing_round_trips(processor) -> None:  # type: ignore[no-untyped-def]
    batch = encode_batch(processor, generate("train", 3))
    packed = pack_pixels(batch["pixel_values"], processor)
    # Half the values (one of two identical frames), each in half the bytes.
    assert packed.dtype == torch.float16 and packed.numel() * 2 == batch["pixel_values"].numel()
    unpacked = unpack_pixels(packed, processor.image_processor.temporal_patch_size)
    assert torch.allclose(unpacked, batch["pixel_values"], atol=2e-3)


def test_batched_vision_attention_and_precomputed_positions_match_stock(processor) -> None:  # type: ignore[no-untyped-def]
    model = build_model(build_config(processor.tokenizer), seed=0).eval()
    same_size = encode_batch(processor, [make_sample(1, i, (168, 168)) for i in range(4)])
    with torch.no_grad():
        stock = model(**same_size).logits
        with batched_vision_attention():
            fast = model(**same_size, position_ids=RopeIndexer(model.config)(same_size)).logits
    assert torch.allclose(stock, fast, atol=1e-5)
    assert train_demo.Glm4vVisionAttention.forward is train_demo._STOCK_VISION_ATTENTION  # restored


def test_batches_are_a_function_of_the_step(processor) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(SMOKE_CONFIG, train_size=None, batch_size=3)
    a, b = TrainBatches(processor, cfg)[5], TrainBatches(processor, cfg)[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], TrainBatches(processor, cfg)[6]["input_ids"])


def test_smoke_run_loss_falls(tmp_path: Path) -> None:
    losses = train_demo.smoke(tmp_path)  # raises if the loss does not fall
    assert losses[-1] < losses[0]
    log = (tmp_path / "loss_log.jsonl").read_text().splitlines()
    assert len(log) == SMOKE_CONFIG.steps // SMOKE_CONFIG.log_every
    assert (tmp_path / "train_state.pt").exists()


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMOKE_CONFIG, steps=4, save_every=2, log_every=1)
    straight = train(cfg, tmp_path / "straight", device="cpu")["losses"]
    train(cfg, tmp_path / "resumed", device="cpu", stop_after=2)
    rest = train(cfg, tmp_path / "resumed", device="cpu", resume=True)["losses"]
    assert rest == pytest.approx(straight[2:], rel=1e-4)


def test_config_file_and_overrides() -> None:
    stages = train_demo.load_stages(REPO / "configs/train/demo.yaml", ["steps=7", "model.layers=1", "lr=5e-4"])
    assert len(stages) == 4  # the recipe that made the committed checkpoint
    for cfg in stages:
        assert cfg.steps == 7 and cfg.model["layers"] == 1 and cfg.seed == 0 and cfg.lr == 5e-4
    assert stages[-1].type_weights == {"count": 0.45}
    with pytest.raises(ValueError):
        load_config(None, ["no_such_key=1"])


def test_time_budget_shortens_the_run_and_still_saves_the_end(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMOKE_CONFIG, steps=10_000, save_every=10_000, calibration_steps=3, time_budget_s=3.0)
    result = train(cfg, tmp_path, device="cpu")
    assert 3 < result["step"] < 10_000
    assert result["step"] == cfg.steps  # the schedule ended where the run did
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["step"] == result["step"]


def test_stages_continue_from_each_other_and_resume_skips_finished_ones(tmp_path: Path) -> None:
    config = tmp_path / "stages.yaml"
    config.write_text(
        "steps: 3\nbatch_size: 4\ntrain_size: 8\nnum_workers: 0\nbf16: false\nlr: 3e-3\nwarmup_steps: 1\n"
        "log_every: 1\nstages:\n  - {}\n  - {steps: 2, lr: 1e-3}\n"
    )
    stages = train_demo.load_stages(config)
    assert [(s.steps, s.lr) for s in stages] == [(3, 3e-3), (2, 1e-3)]
    with pytest.raises(ValueError):
        load_config(config)
    out = tmp_path / "run"
    result = train_demo.train_stages(stages, out, device="cpu")
    assert result["step"] == 2
    assert (out / "stage-1" / "weights" / "model.safetensors").exists()
    assert (out / "stage-2" / "weights" / "model.safetensors").exists()
    # Stage 2 started from stage 1's exported weights: its first loss is stage 1's level, not a
    # fresh model's.
    first = [float(line.split('"loss": ')[1].split(",")[0]) for line in (out / "stage-1" / "loss_log.jsonl").open()]
    second = [float(line.split('"loss": ')[1].split(",")[0]) for line in (out / "stage-2" / "loss_log.jsonl").open()]
    assert second[0] < first[0]
    again = train_demo.train_stages(stages, out, device="cpu", resume=True)
    assert again["step"] == 2 and again["model"] is not result["model"]
