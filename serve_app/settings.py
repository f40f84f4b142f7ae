"""Every setting of the application, validated once from `serve_config.yaml`'s `args`.

Ray Serve validates the config's `args` into `AppArgs` (the builder is typed), and each deployment
receives only the part it needs. Nothing else in the project reads the environment or keeps
globals: this module is the single source of configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# Relative paths in configs resolve against the project root, so `serve run` works from there and
# `serve deploy` (whose working directory is the Ray worker's) finds the same files.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageSettings(_Settings):
    """Limits and fetch policy of the ImagePreprocessor."""

    max_image_bytes: int = Field(5 * 1024 * 1024, gt=0, description="Largest encoded image accepted.")
    max_decoded_pixels: int = Field(
        40_000_000, gt=0, description="Images with more pixels are refused before decoding (bombs)."
    )
    max_side: int = Field(1024, ge=28, description="Images are shrunk to fit max_side x max_side.")
    max_aspect_ratio: float = Field(200.0, ge=1.0, description="GLM's processor refuses above 200.")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    max_redirects: int = Field(3, ge=0)
    max_pixels: int | None = Field(
        None, gt=0, description="Pixel budget per image for detail 'high' (None: the model processor's own)."
    )
    detail_low_max_pixels: int = Field(448 * 448, gt=0, description="Pixel budget for detail 'low'.")
    detail_auto_max_pixels: int | None = Field(
        None, gt=0, description="Pixel budget for detail 'auto' (None: as 'high'); smaller images keep their size."
    )
    cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Preprocessed images kept by content hash.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts, IP addresses or CIDR networks that may be fetched even though they are "
        "loopback, private, link-local or reserved (e.g. ['127.0.0.1'] in tests).",
    )


class BatchSettings(_Settings):
    """Dynamic batching knobs of the VLMServer; sent as `user_config` so they change live."""

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=5.0)
    stall_timeout_s: float = Field(
        60.0, gt=0, description="The health check fails when a running batch makes no step for this long."
    )
    token_budget: int | None = Field(
        None, ge=16, description="Tokens in flight (prompts with image tokens + max_tokens) the replica accepts."
    )
    max_images_in_flight: int | None = Field(None, ge=1, description="Images in flight the replica accepts.")
    admission_timeout_s: float = Field(
        10.0, ge=0, description="How long a request waits for budget before a 503 with Retry-After."
    )
    stream_interval_s: float = Field(
        0.0, ge=0, le=1.0,
        description="Continuous engine: after each chunk of a stream, gather tokens this long before the next "
        "(0: each token as soon as it is decoded). Fewer, longer chunks at high concurrency; a stream's first "
        "token and its end are never held back.",
    )


GptqBackend = Literal["auto", "tinygemm", "torch", "torch_int8", "torch_fused", "marlin", "triton", "exllama_v2"]


class QuantizationSettings(_Settings):
    """How quantized weights load and whether the KV cache is quantized (a model YAML's `quantization:`)."""

    gptq_backend: GptqBackend = Field(
        "auto", description="Kernel for GPTQ checkpoints: 'tinygemm' (PyTorch's int4 matmul, 4 bits; "
        "engine/quant/int4_linear.py) or one of gptqmodel's; 'auto' picks per device and bit width."
    )
    kv_cache: Literal["none", "int8", "int4"] = Field(
        "none", description="Quantize the KV cache (transformers' QuantizedCache, HQQ backend; pip install hqq)."
    )
    kv_cache_group_size: int = Field(64, ge=8, description="Values sharing one scale in the quantized cache.")
    kv_cache_residual_length: int = Field(
        128, ge=0, description="Most recent tokens kept in full precision before they are quantized."
    )


EngineKind = Literal["auto", "generate", "continuous"]


class ContinuousEngineSettings(_Settings):
    """The continuous-batching engine (engine/continuous): slots, buckets, CUDA graphs."""

    max_slots: int = Field(
        32, ge=1, le=1024,
        description="Sequences decoding at once (KV cache slots, each max_model_len long); later arrivals "
        "wait for a free slot.",
    )
    kv_cache_memory_fraction: float = Field(
        0.7, gt=0, le=1,
        description="On a GPU, the slot cache takes at most this share of the memory free after loading the "
        "weights; max_slots is lowered to fit (with a warning).",
    )
    batch_buckets: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
        description="Decode batch sizes with their own CUDA graph; a step runs at the smallest bucket that "
        "holds every active sequence (capped at max_slots).",
    )
    min_length_bucket: int = Field(
        256, ge=16,
        description="Attention reads the cache up to the next power of two of the longest sequence, never less.",
    )
    max_prefill_tokens: int = Field(
        4096, ge=16,
        description="Prompt tokens (padded) prefilled in one forward pass; arrivals beyond wait for the next "
        "iteration. Smaller: earlier first tokens for the first arrivals of a burst, and shorter pauses of the "
        "running sequences (whose steps wait for each prefill); larger: fewer passes.",
    )
    cuda_graphs: bool = Field(False, description="Capture decode steps in CUDA graphs (CUDA only).")
    compile: bool = Field(False, description="torch.compile the decode step (then captured, with cuda_graphs).")
    compile_mode: str = Field(
        "default",
        description="torch.compile mode for the decode step (one without CUDA graphs of its own: they are captured "
        "here). 'max-autotune-no-cudagraphs' tunes every GEMM shape: much longer to start, not measured faster.",
    )
    switch_interval_s: float | None = Field(
        0.0005, gt=0, le=0.1,
        description="On a GPU, the replica process's GIL switch interval (sys.setswitchinterval): the engine "
        "thread waits at most about this long for the GIL while the event loop that streams the tokens holds "
        "it. Python's default, 5 ms, is half a decode step. None: leave it as it is.",
    )
    warmup_max_len: int = Field(
        1024, ge=0,
        description="With cuda_graphs, graphs for cache lengths up to this are captured at load; longer ones "
        "on first use (which pauses decoding while they are made).",
    )

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_sorted(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch_buckets must be positive sizes")
        return sorted(set(value))


class ModelSettings(_Settings):
    """What to serve: one YAML file in `configs/models/` per model."""

    id: str = Field(description="The name clients pass as `model` and `/v1/models` lists.")
    aliases: list[str] = Field(default_factory=list, description="Other accepted names.")
    path: str = Field(description="Local checkpoint directory or a hub id.")
    load_format: Literal["auto", "dummy"] = Field(
        "auto",
        description="'dummy': the checkpoint's config, processor and tokenizer with random weights (as vLLM's "
        "--load-format dummy), to benchmark a model's shape where its weights are not at hand. The weights are made "
        "unquantized, in `dtype` (a GPTQ checkpoint's layout is not reproduced).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="'auto' picks cuda when present, else cpu.")
    max_model_len: int = Field(4096, ge=16, description="Prompt plus completion tokens, at most.")
    default_max_tokens: int = Field(256, ge=1)
    owned_by: str = "vlm-serve"
    system_prompt: str | None = Field(None, description="Prepended when a request has no system turn.")
    quantization: QuantizationSettings = QuantizationSettings()
    engine: EngineKind = Field(
        "auto",
        description="'continuous': iteration-level batching over a slot KV cache (GLM-4V text decoders); "
        "'generate': one transformers generate() per batch; 'auto': continuous where supported.",
    )
    continuous: ContinuousEngineSettings = ContinuousEngineSettings()
    engine_process: bool = Field(
        False,
        description="Run the engine in a process of its own, which the model replica drives over pipes: the "
        "replica's request handling then never shares a GIL with the engine's kernel launches (RESULTS.md run G). "
        "Costs a second process start and the processor loaded twice.",
    )

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]

    def checkpoint_dir(self) -> Path | None:
        """The local directory of the checkpoint, or None when `path` is a hub id."""
        local = resolve_path(self.path)
        if local.exists():
            return local
        return None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelSettings":
        with open(resolve_path(path), encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f))


class ApiKey(_Settings):
    """One configured key: `key` in the clear or its `sha256` hex digest, with an owner's name."""

    name: str = "default"
    key: SecretStr | None = None
    sha256: str | None = None
    requests_per_minute: int | None = Field(None, ge=1, description="Overrides rate_limits for this key.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Overrides rate_limits for this key.")


class RateLimitSettings(_Settings):
    """Per API key (per client address when the service is open), over a sliding minute."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class CorsSettings(_Settings):
    allow_origins: list[str] = ["*"]
    allow_methods: list[str] = ["*"]
    allow_headers: list[str] = ["*"]
    allow_credentials: bool = False
    max_age_s: int = 600


class IngressSettings(_Settings):
    """HTTP-facing policy of the Ingress: keys, rate limits, CORS and request limits."""

    api_keys: list[ApiKey | str] = Field(
        default_factory=list,
        description="Keys as 'KEY', 'NAME:KEY', 'sha256:HEX', 'NAME:sha256:HEX' or {name, key|sha256}.",
    )
    api_keys_file: str | None = Field(None, description="A file with one key per line, same forms.")
    api_keys_env: str | None = Field(None, description="An environment variable with comma-separated keys.")
    rate_limits: RateLimitSettings = RateLimitSettings()
    cors: CorsSettings = CorsSettings()
    max_request_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    max_tokens_ceiling: int = Field(4096, ge=1, description="Largest max_tokens a client may ask.")
    max_messages: int = Field(128, ge=1)
    max_images_per_request: int = Field(8, ge=0)

    @property
    def rate_limited(self) -> bool:
        """Whether any budget is configured, for everyone or for some key."""
        keyed = (k for k in self.api_keys if isinstance(k, ApiKey))
        return self.rate_limits.enabled or any(k.requests_per_minute or k.tokens_per_minute for k in keyed)


class AppArgs(_Settings):
    """The `args` of `serve_config.yaml`: everything the application builder needs."""

    model: str = Field("configs/models/demo.yaml", description="Path of the model's YAML config.")
    images: ImageSettings = ImageSettings()
    batching: BatchSettings = BatchSettings()
    ingress: IngressSettings = IngressSettings()

    @field_validator("model")
    @classmethod
    def _model_config_exists(cls, value: str) -> str:
        if not resolve_path(value).is_file():
            raise ValueError(f"model config {value!r} not found")
        return value

    def model_settings(self) -> ModelSettings:
        return ModelSettings.from_yaml(self.model)
