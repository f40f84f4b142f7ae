"""Train the embedded demo model on the synthetic VQA set (demo/vqa_data.py).

    python -m demo.train --config configs/train/demo.yaml --out /tmp/demo-run \\
        --export checkpoints/glm4v-demo-vqa          # a GPU takes minutes
    python -m demo.train --config configs/train/demo.yaml --out /tmp/demo-run --resume
    python -m demo.train --config configs/train/demo-finetune.yaml --init-from checkpoints/glm4v-demo-vqa \
        --out /tmp/demo-ft --export /tmp/demo-ft-export --eval 500     # continue from the checkpoint
    python -m demo.train --smoke           # CPU, a few steps, asserts the loss falls

Inputs are built exactly as the server builds them: the processor's chat template with one image
(or none, for a text-only request) and the question, then the answer and `<|endoftext|>`; the loss
covers the answer tokens only.
Batch `i` is a pure function of (seed, i), so a run is reproducible from its config and resumes
on exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from transformers import Glm4vConfig
from transformers.models.glm4v.modeling_glm4v import (
    Glm4vModel,
    Glm4vVisionAttention,
    apply_rotary_pos_emb_vision,
)

from demo.model import build_config, build_model, build_processor, build_tokenizer
from demo.prompt_format import EOS, SYSTEM_PROMPTS, PromptStyle, build_prompt
from demo.vqa_data import IMAGE_SIZES, VQASample, generate, split_seed, training_sample, type_shares

STATE_FILE = "train_state.pt"
LOG_FILE = "loss_log.jsonl"


@dataclass
class TrainConfig:
    """Everything a run depends on; read from YAML (configs/train/demo.yaml)."""

    seed: int = 0
    # Passed to demo.model.build_config (hidden_size, layers, vision_depth, ...).
    model: dict[str, int] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # None: every step draws fresh samples. An int: cycle over the first N (the smoke test's
    # tiny fixed set, which a few steps can fit).
    train_size: int | None = None
    # Share of training questions per type, e.g. {count: 0.4}; core types not named split the
    # rest evenly, and the extra types (vqa_data.EXTRA_TYPES: canvas, scene, photo, ...) are drawn
    # only when named. None: the five core types equally often. Lets a continued run work on its
    # weakest type, or add the extra kinds as a modest share.
    type_weights: dict[str, float] | None = None
    # Share of core-type questions asked in a training paraphrase instead of a base wording.
    paraphrase_fraction: float = 0.0
    # Shares of training prompts with the question before the image, and with a system prompt.
    text_first_fraction: float = 0.3
    system_fraction: float = 0.1
    num_workers: int = 4
    bf16: bool = True
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    eval_samples: int = 200
    eval_batch_size: int = 64
    # Samples per extra evaluation row (paraphrases and each extra type) at each evaluation; 0: the
    # core validation samples only. These rows use training wordings only, so choosing the best
    # weights never looks at the held-out wordings.
    eval_extra: int = 0
    max_bad_steps: int = 20
    # Weights to start from (a save_pretrained directory), as --init-from gives; the command
    # line's --init-from wins. None: a fresh model built from `model`.
    init_from: str | None = None
    # Wall-clock budget in seconds (None: run all `steps`). A leased GPU gives a run minutes, not
    # steps: after `calibration_steps` the run measures its pace and shortens `steps` to what fits,
    # still inside warm-up, so the learning-rate schedule still ends its decay on the last step.
    time_budget_s: float | None = None
    calibration_steps: int = 100


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a single-stage YAML config, then apply `key=value` overrides (values parsed as YAML)."""
    stages = load_stages(path, overrides)
    if len(stages) != 1:
        raise ValueError(f"{path} describes {len(stages)} stages; use load_stages")
    return stages[0]


def load_stages(path: str | Path | None, overrides: Sequence[str] = ()) -> list[TrainConfig]:
    """The run a YAML file describes: one config, or one per entry of its `stages:` list.

    Each stage is the file's top-level keys updated by that stage's own; overrides apply to every
    stage. Stage k continues from stage k-1's weights (see `train_stages`).
    """
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) if path else {}
    stages = data.pop("stages", None) or [{}]
    return [_config_from(_with_overrides({**data, **stage}, overrides)) for stage in stages]


def _with_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # a deep copy: stages must not share nested dicts
    for item in overrides:
        key, _, value = item.partition("=")
        target = data
        *parents, leaf = key.split(".")
        for name in parents:
            target = target.setdefault(name, {})
        target[leaf] = yaml.safe_load(value)
    return data


def _config_from(data: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown training config keys: {sorted(unknown)}")
    # YAML 1.1 reads `5e-4` (no dot) as a string; float fields take it as the number it means.
    # (Not pydantic: the GPU machines that train have torch and transformers, not pydantic.)
    floats = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", "float | None")}
    for name in floats & set(data):
        if isinstance(data[name], str):
            data[name] = float(data[name])
    type_shares(data.get("type_weights"))  # unknown types or weights summing past 1 fail here
    return TrainConfig(**data)


SMOKE_CONFIG = TrainConfig(
    seed=0,
    model={},  # build_config's defaults: the tiny plumbing model
    steps=20,
    batch_size=8,
    lr=3e-3,
    warmup_steps=3,
    train_size=16,
    num_workers=0,
    bf16=False,
    log_every=5,
    save_every=10,
)


# ----------------------------------------------------------------------------------------------
# Inputs, made exactly like serving


# System prompts a client might send; a few training prompts carry one so the model ignores them.
def encode_batch(
    processor: Any, samples: Sequence[VQASample], styles: Sequence[PromptStyle] | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + answer + EOS, with labels on the answer tokens only.

    A sample without an image is a text-only turn; a batch without any image has no
    `pixel_values` or `image_grid_thw`.
    """
    styles = styles or [PromptStyle()] * len(samples)
    texts = [
        build_prompt(processor, s.question, st, image=s.image is not None) + s.answer + EOS
        for s, st in zip(samples, styles)
    ]
    images = [s.image for s in samples if s.image is not None]
    enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    input_ids = enc["input_ids"]
    labels = torch.full_like(input_ids, -100)
    for row, sample in enumerate(samples):
        answer_ids = processor.tokenizer(sample.answer + EOS, add_special_tokens=False)["input_ids"]
        n = len(answer_ids)
        # Left padding puts every answer at the end of its row. The check guards against a
        # tokenizer merging across the prompt/answer boundary, which would misalign the labels.
        if input_ids[row, -n:].tolist() != answer_ids:
            raise ValueError(f"answer tokens not at the end of row {row}: {sample.answer!r}")
        labels[row, -n:] = input_ids[row, -n:]
    batch = {
        "input_ids": input_ids,
        "attention_mask": enc["attention_mask"],
        "mm_token_type_ids": enc["mm_token_type_ids"],
        "labels": labels,
    }
    if images:
        batch["pixel_values"], batch["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    return batch


class RopeIndexer:
    """GLM-4V's multimodal RoPE positions, computed on the CPU in a data worker.

    The model computes them itself when `position_ids` is not passed, but its per-row Python loop
    with GPU syncs costs more than the rest of a small model's step. Same code, same result.
    """

    get_rope_index = Glm4vModel.get_rope_index
    get_vision_position_ids = Glm4vModel.get_vision_position_ids

    def __init__(self, config: Glm4vConfig) -> None:
        self.config = config

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        position_ids, _ = self.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        return position_ids


class TrainBatches(Dataset):
    """Item `i` is training batch `i`: drawn and encoded in a worker, identical on every run."""

    def __init__(self, processor: Any, cfg: TrainConfig, rope: RopeIndexer | None = None) -> None:
        self.processor = processor
        self.cfg = cfg
        self.rope = rope
        # Derived from the run's seed so two configs with different seeds see different data.
        self.data_seed = split_seed("train") + cfg.seed

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        b = self.cfg.batch_size
        indices = [step * b + k for k in range(b)]
        if self.cfg.train_size:
            indices = [i % self.cfg.train_size for i in indices]
        # One image size per batch for the core samples (sizes still vary from batch to batch):
        # equal-length images let the vision tower attend in one batched call. The extra kinds
        # keep their own sizes, which clients send too (see batched_vision_attention).
        size = random.Random(f"size:{self.data_seed}:{step}").choice(IMAGE_SIZES)
        samples = [
            training_sample(
                self.data_seed,
                i,
                size,
                weights=self.cfg.type_weights,
                paraphrase_fraction=self.cfg.paraphrase_fraction,
            )
            for i in indices
        ]
        batch = encode_batch(self.processor, samples, [self.style(i) for i in indices])
        if self.rope is not None:
            batch["position_ids"] = self.rope(batch)
        if "pixel_values" in batch:
            batch["pixel_values"] = pack_pixels(batch["pixel_values"], self.processor)
        return batch

    def style(self, index: int) -> PromptStyle:
        # Many OpenAI clients put the text before the image, and some send a system prompt:
        # training on a share of those layouts keeps answers right whatever the client sends.
        rng = random.Random(f"style:{self.data_seed}:{index}")
        image_first = rng.random() >= self.cfg.text_first_fraction
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < self.cfg.system_fraction else None
        return PromptStyle(image_first, system)


def pack_pixels(pixel_values: torch.Tensor, processor: Any) -> torch.Tensor:
    """The processor's pixel rows, 4x smaller for the trip from a worker to the GPU.

    GLM's processor repeats a still image over `temporal_patch_size` frames, so half of every
    row is a copy; the rest travels as fp16 (pixels are 8-bit, so fp16 loses nothing that
    matters). `unpack_pixels` rebuilds the processor's exact layout on the device.
    """
    t = processor.image_processor.temporal_patch_size
    rows = pixel_values.view(pixel_values.shape[0], 3, t, -1)
    return rows[:, :, 0].to(torch.float16).contiguous()


def unpack_pixels(packed: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    n, channels, patch_area = packed.shape
    frames = packed.unsqueeze(2).expand(n, channels, temporal_patch_size, patch_area)
    return frames.reshape(n, -1).float()


def _worker_init(_: int) -> None:
    # Each worker draws and encodes on one core; many threads per worker only contend.
    torch.set_num_threads(1)


def batch_loader(
    processor: Any, cfg: TrainConfig, start_step: int, rope: RopeIndexer | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    dataset = TrainBatches(processor, cfg, rope)
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start_step, cfg.steps),
        num_workers=cfg.num_workers,
        worker_init_fn=_worker_init if cfg.num_workers else None,
        prefetch_factor=4 if cfg.num_workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# Training


def _batched_vision_attention(
    self: Glm4vVisionAttention,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Glm4vVisionAttention.forward as one batched SDPA call over all images.

    Without flash-attention the stock forward attends image by image, a Python loop of small
    kernels per layer that dominates a tiny model's step. When every image has the same number of
    patches, attention within each image is exactly one batched call. Images of different sizes
    are padded to the longest, with the padding masked out of every key: the same math, still one
    call.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_images, seq = lengths.numel(), hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    length = seq // n_images
    if seq == n_images * length and not bool((lengths != length).any()):
        q, k, v = (t.reshape(n_images, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))
    # Row i of the padded layout holds image i's patches, then padding up to the longest image.
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=hidden_states.device)
    valid = offsets[None, :] < lengths[:, None]  # (images, longest)
    index = (cu_seqlens[:-1, None] + offsets[None, :]).clamp(max=seq - 1)
    q, k, v = (t[index].transpose(1, 2) for t in (q, k, v))  # (images, heads, longest, head_dim)
    mask = valid[:, None, None, :]  # padded keys get no attention; every row keeps a real key
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
    # Valid positions in row-major order are exactly the original sequence order.
    return self.proj(out.transpose(1, 2)[valid].reshape(seq, -1))


_STOCK_VISION_ATTENTION = Glm4vVisionAttention.forward


@contextmanager
def batched_vision_attention() -> Iterator[None]:
    """Use `_batched_vision_attention` inside the block (training only; same math)."""
    Glm4vVisionAttention.forward = _batched_vision_attention  # type: ignore[method-assign]
    try:
        yield
    finally:
        Glm4vVisionAttention.forward = _STOCK_VISION_ATTENTION  # type: ignore[method-assign]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-d tensors), as usual for transformers.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=fused)


class Progress:
    """A tqdm bar on a terminal when tqdm is installed; plain prints otherwise (logs, CI)."""

    def __init__(self, total: int, initial: int, every: int) -> None:
        self.every = every
        self.total = total
        self.bar: Any = None
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": dataclasses.asdict(cfg),
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(path)  # never leave a half-written checkpoint behind


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    init_from: str | Path | None = None,
    device: str | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) training; returns the model, processor and the logged losses.

    `stop_after` ends this call after that many steps (as if interrupted), for testing resume.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    init_from = init_from or cfg.init_from
    if init_from:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # Continue from trained weights (fresh optimizer), e.g. in a second GPU session. The
        # checkpoint's own tokenizer comes along: a rebuilt one could number tokens differently.
        processor = AutoProcessor.from_pretrained(init_from)
        model = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32)
    else:
        processor = build_processor(build_tokenizer())
        model = build_model(build_config(processor.tokenizer, **cfg.model), cfg.seed)
    model.to(dev).train()
    optimizer = make_optimizer(model, cfg)

    state_path = out / STATE_FILE
    start = load_state(state_path, model, optimizer) if resume and state_path.exists() else 0
    (out / "train_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    log = (out / LOG_FILE).open("a" if start else "w")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {dev}; steps {start}..{cfg.steps}", flush=True)

    losses: list[float] = []
    # The weights with the best validation score (evaluate.score's `selection`), kept in case a
    # late phase of training gets worse (a small model's vision pathway can collapse at too high
    # a learning rate).
    best: dict[str, Any] = {"accuracy": -1.0, "step": None, "state": None}
    with batched_vision_attention():
        step = _train_loop(model, processor, optimizer, cfg, start, dev, log, losses, state_path, stop_after, best)
    log.close()
    # Again at the end: a time budget may have changed `steps`, and the file should say what ran.
    (out / "train_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if best["state"] is not None and best["step"] != step:
        print(f"keeping step {best['step']} (validation score {best['accuracy']:.3f})", flush=True)
        model.load_state_dict(best["state"])
    model.eval()
    return {"model": model, "processor": processor, "losses": losses, "step": step, "best": best}


def _train_loop(
    model: Any,
    processor: Any,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    start: int,
    dev: torch.device,
    log: Any,
    losses: list[float],
    state_path: Path,
    stop_after: int | None = None,
    best: dict[str, Any] | None = None,
) -> int:
    use_bf16 = cfg.bf16 and dev.type == "cuda"
    temporal = processor.image_processor.temporal_patch_size
    progress = Progress(cfg.steps, start, cfg.log_every)
    started = time.time()
    step = start
    data_wait = 0.0  # seconds spent waiting on the data workers: tells what bounds a run
    bad_steps = 0
    loader = batch_loader(processor, cfg, start, RopeIndexer(model.config))
    planned = cfg.steps  # a time budget may shorten the run, never lengthen it past this
    while True:
        waited = time.time()
        batch = next(loader, None)
        data_wait += time.time() - waited
        if batch is None or step >= cfg.steps or (stop_after is not None and step - start >= stop_after):
            break
        # The pace is measured after the first steps (which compile and warm caches) and again
        # every few hundred steps, since a GPU shared with other work changes speed.
        since = step - start
        if cfg.time_budget_s and since >= cfg.calibration_steps and since % cfg.calibration_steps == 0:
            _fit_steps_to_budget(cfg, step, start, time.time() - started, planned)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = unpack_pixels(batch["pixel_values"], temporal)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        value = float(loss.detach())  # one sync a step: cheap next to the rest of the step
        step += 1
        # A non-finite loss or gradient would poison the weights for good: skip that update,
        # and stop a run that keeps producing them instead of burning accelerator time.
        if math.isfinite(value) and bool(torch.isfinite(grad_norm)):
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            print(f"step {step}: non-finite loss {value} / grad norm {float(grad_norm)}; update skipped", flush=True)
            if bad_steps >= cfg.max_bad_steps:
                raise FloatingPointError(f"{bad_steps} non-finite steps in a row at step {step}")
        losses.append(value)
        progress.update(step, value, lr)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {
                "step": step,
                "loss": round(value, 5),
                "lr": lr,
                "elapsed_s": round(time.time() - started, 1),
                "data_wait_s": round(data_wait, 1),
                "grad_norm": round(float(grad_norm), 4),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            accuracy = _log_eval(model, processor, cfg, step, log)
            if best is not None and accuracy > best["accuracy"]:
                best.update(
                    accuracy=accuracy,
                    step=step,
                    state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                )
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(state_path, model, optimizer, step, cfg)
    progress.close()
    return step


def _fit_steps_to_budget(cfg: TrainConfig, step: int, start: int, elapsed: float, planned: int) -> None:
    """Set `cfg.steps` to what fits `time_budget_s` at the pace so far (at most `planned`)."""
    pace = elapsed / max(1, step - start)
    # Evaluations still to come are not in the pace: keep a tenth of the budget in reserve.
    fitting = min(planned, max(step + 1, step + int((0.9 * cfg.time_budget_s - elapsed) / pace)))
    # Said aloud only when the plan moves by more than 2%: the pace drifts a little every check.
    if abs(fitting - cfg.steps) > 0.02 * cfg.steps:
        print(f"time budget {cfg.time_budget_s:.0f}s at {pace * 1000:.0f} ms/step: {fitting} steps", flush=True)
    cfg.steps = fitting


def _log_eval(model: Any, processor: Any, cfg: TrainConfig, step: int, log: Any) -> float:
    from demo.evaluate import evaluate_offline

    model.eval()
    result = evaluate_offline(
        model,
        processor,
        split="validation",
        n=cfg.eval_samples,
        batch_size=cfg.eval_batch_size,
        extra=cfg.eval_extra,
        held_out=False,
    )
    reliance = image_reliance(model, processor)
    model.train()
    record = {
        "step": step,
        "val_accuracy": result["overall"],
        "val_per_type": result["per_type"],
        "image_reliance": round(reliance, 4),
    }
    if cfg.eval_extra:
        record["val_extras"] = {name: row["accuracy"] for name, row in result["extras"].items()}
        record["val_ran_to_max_tokens"] = result["ran_to_max_tokens"]
    log.write(json.dumps(record) + "\n")
    log.flush()
    extras = f" extras {record['val_extras']} at max_tokens {result['ran_to_max_tokens']}" if cfg.eval_extra else ""
    print(
        f"step {step}: validation accuracy {result['overall']:.3f} {result['per_type']}{extras}"
        f" image reliance {reliance:.3f}",
        flush=True,
    )
    return float(result["selection"])


@torch.no_grad()
def image_reliance(model: Any, processor: Any, n: int = 32) -> float:
    """How much the answers depend on the image: validation loss on blank images minus real ones.

    Near zero means the model answers from the question alone. Watching it catches the failure
    seen on a first GPU run, where the vision tower's output collapsed to a constant (the text
    model used image positions as attention sinks) while the loss looked merely stuck.
    """
    samples = generate("validation", n)
    batch = encode_batch(processor, samples)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    real = float(model(**batch).loss)
    blank = dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"]))
    return float(model(**blank).loss) - real


def export(model: Any, processor: Any, out_dir: str | Path, max_shard_size: str | None = None) -> Path:
    """save_pretrained the model (fp32 safetensors) and processor: a loadable checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=torch.float32).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    processor.save_pretrained(out)
    return out


def smoke(out_dir: str | Path, steps: int = SMOKE_CONFIG.steps) -> list[float]:
    """A few CPU steps on a tiny fixed set; raises if the loss does not fall."""
    cfg = dataclasses.replace(SMOKE_CONFIG, steps=steps)
    losses = train(cfg, out_dir, device="cpu")["losses"]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"smoke: loss {first:.3f} -> {last:.3f}")
    if not last < 0.7 * first:
        raise AssertionError(f"smoke: loss did not fall enough ({first:.3f} -> {last:.3f})")
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/demo.yaml")
    parser.add_argument("--out", default="/tmp/glm4v-demo-train", help="run directory: state, loss log")
    parser.add_argument("--export", help="write the final checkpoint (save_pretrained) here")
    parser.add_argument("--max-shard-size", help="e.g. 10MB: split model.safetensors on export")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--init-from", help="start from this checkpoint's weights")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--eval", type=int, default=0, help="after training, score N test samples")
    parser.add_argument(
        "--eval-extra",
        type=int,
        help="with --eval: samples per extra row (held-out paraphrases, each extra type); default N/5",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: asserts the loss falls")
    parser.add_argument(
        "--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config keys (repeatable)"
    )
    args = parser.parse_args(argv)

    if args.smoke:
        smoke(args.out)
        return 0
    stages = load_stages(args.config, args.set)
    started = time.time()
    result = train_stages(stages, args.out, resume=args.resume, init_from=args.init_from, device=args.device)
    print(f"trained to step {result['step']} in {time.time() - started:.0f}s", flush=True)
    if args.eval:  # before export, which moves the model to the CPU
        from demo.evaluate import evaluate_offline, format_table

        extra = args.eval // 5 if args.eval_extra is None else args.eval_extra
        scores = evaluate_offline(result["model"], result["processor"], split="test", n=args.eval, extra=extra)
        print(format_table(scores), flush=True)
        (Path(args.out) / "test_eval.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False))
    if args.export:
        export(result["model"], result["processor"], args.export, args.max_shard_size)
        print(f"exported to {args.export}", flush=True)
    return 0


def train_stages(
    stages: Sequence[TrainConfig],
    out_dir: str | Path,
    *,
    resume: bool = False,
    init_from: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the stages in order, each from the previous one's weights with a fresh optimizer.

    One stage writes to OUT itself; several write to OUT/stage-K, each ending in a loadable
    OUT/stage-K/weights checkpoint, so `--resume` skips the stages already done.
    """
    if len(stages) == 1:
        return train(stages[0], out_dir, resume=resume, init_from=init_from, device=device)
    result: dict[str, Any] = {}
    for k, cfg in enumerate(stages, start=1):
        stage_dir = Path(out_dir) / f"stage-{k}"
        weights = stage_dir / "weights"
        if resume and (weights / "config.json").exists():
            print(f"stage {k}/{len(stages)}: done already ({weights})", flush=True)
        else:
            print(f"stage {k}/{len(stages)}: {cfg.steps} steps at lr {cfg.lr:g}", flush=True)
            result = train(cfg, stage_dir, resume=resume, init_from=init_from, device=device)
            export(result["model"], result["processor"], weights)
        init_from = weights
    if not result:  # every stage was done already: hand back the last one's weights
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32).eval()
        result = {"model": model, "processor": AutoProcessor.from_pretrained(init_from), "step": stages[-1].steps}
    result["model"].to(pick_device(device))
    return result


if __name__ == "__main__":
    sys.exit(main())
