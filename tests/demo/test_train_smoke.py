"""Training the demo model: serving-identical inputs, the CPU smoke run, resume, config, and the
fine-tuning run from the committed checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
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
from demo.vqa_data import EXTRA_TYPES, generate, make_extra_sample, make_sample, training_sample
from demo.wordings import HONEST_ANSWER

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "checkpoints" / "glm4v-demo-vqa"
FINETUNE = REPO / "configs" / "train" / "demo-finetune.yaml"


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


def test_text_only_samples_encode_with_labels_on_the_answer(processor) -> None:  # type: ignore[no-untyped-def]
    samples = [make_extra_sample(0, 0, "no_image"), generate("train", 1)[0], make_extra_sample(0, 1, "no_image")]
    batch = encode_batch(processor, samples)
    assert batch["image_grid_thw"].shape[0] == 1  # only the one image
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(labelled) == sample.answer + "<|endoftext|>"
        assert bool((batch["input_ids"][row] == image_token).any()) == (sample.image is not None)
    assert samples[0].answer == HONEST_ANSWER["en"] and samples[2].answer == HONEST_ANSWER["zh"]
    # A batch with no image at all: no pixels, and the model still trains on it.
    text_only = encode_batch(processor, [make_extra_sample(0, i, "no_image") for i in range(3)])
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only
    model = build_model(build_config(processor.tokenizer), seed=0)
    loss = model(**text_only, position_ids=RopeIndexer(model.config)(text_only)).loss
    loss.backward()
    assert math.isfinite(float(loss.detach()))


def test_batched_vision_attention_matches_stock_on_mixed_sizes(processor) -> None:  # type: ignore[no-untyped-def]
    model = build_model(build_config(processor.tokenizer), seed=0).eval()
    samples = [
        make_sample(1, 0, (168, 168)),
        make_extra_sample(1, 0, "canvas", size=(64, 64)),
        make_extra_sample(1, 1, "no_image"),
        make_extra_sample(1, 2, "photo", size=(320, 240)),
        make_sample(1, 3, (224, 224)),
    ]
    batch = encode_batch(processor, samples)
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 4  # four sizes of image
    with torch.no_grad():
        stock = model(**batch).logits
        with batched_vision_attention():
            fast = model(**batch, position_ids=RopeIndexer(model.config)(batch)).logits
    assert torch.allclose(stock, fast, atol=1e-5)


def test_batches_with_the_extra_types(processor) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(train_demo.load_config(FINETUNE), batch_size=24, num_workers=0)
    first, again = TrainBatches(processor, cfg)[3], TrainBatches(processor, cfg)[3]
    assert all(torch.equal(first[k], again[k]) for k in first)
    drawn = [
        training_sample(TrainBatches(processor, cfg).data_seed, 3 * 24 + k, weights=cfg.type_weights) for k in range(24)
    ]
    assert {s.question_type for s in drawn} & set(EXTRA_TYPES)
    assert first["image_grid_thw"].shape[0] == sum(s.image is not None for s in drawn)
    labels = [processor.tokenizer.decode(row[row != -100]) for row in first["labels"]]
    assert labels == [s.answer + "<|endoftext|>" for s in drawn]
    only_text = dataclasses.replace(cfg, type_weights={"no_image": 1.0}, batch_size=4)
    batch = TrainBatches(processor, only_text)[0]
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 4
    with pytest.raises(ValueError):
        train_demo.load_config(None, ["type_weights={poetry: 0.5}"])


def test_the_finetune_config_continues_the_checkpoint_within_about_six_minutes() -> None:
    (cfg,) = train_demo.load_stages(FINETUNE)
    assert cfg.init_from == "checkpoints/glm4v-demo-vqa" and (REPO / cfg.init_from / "config.json").exists()
    assert cfg.batch_size == 128 and cfg.bf16
    # 300 s of steps (10-13 steps/s at batch 128 on one H100: 3,000-3,900 steps), plus start-up,
    # evaluations and export: about six minutes.
    assert cfg.time_budget_s == 300 and cfg.steps >= 13 * 300 and cfg.calibration_steps <= cfg.warmup_steps
    assert set(EXTRA_TYPES) <= set(cfg.type_weights or {})
    assert 0 < cfg.paraphrase_fraction < 0.5 and cfg.eval_extra > 0


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").exists(), reason="needs the committed demo checkpoint")
def test_finetune_command_from_the_committed_checkpoint_on_cpu(tmp_path: Path) -> None:
    """The lead's command, a few steps with a small batch on the CPU: finite loss, a loadable export."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from demo.evaluate import generate_answers
    from demo.vqa_data import is_correct

    run, export = tmp_path / "run", tmp_path / "export"
    argv = ["--config", str(FINETUNE), "--init-from", str(CHECKPOINT), "--out", str(run), "--export", str(export)]
    argv += ["--eval", "5", "--eval-extra", "1", "--device", "cpu", "--set", "steps=2", "batch_size=6"]
    argv += ["num_workers=0", "bf16=false", "time_budget_s=null", "log_every=1", "eval_every=0"]
    assert train_demo.main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (run / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    scores = json.loads((run / "test_eval.json").read_text())
    assert scores["n"] == 5 and scores["answered"] == 5 + 1 + len(EXTRA_TYPES)
    # The export loads as the server loads it, and still answers as the committed weights did:
    # two steps at a warm-up learning rate move them very little (a fresh model gets none right).
    processor = AutoProcessor.from_pretrained(export)
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    samples = generate("test", 5)
    answers = generate_answers(model, processor, samples)
    assert sum(is_correct(a, s.answer) for a, s in zip(answers, samples)) >= 4, answers
