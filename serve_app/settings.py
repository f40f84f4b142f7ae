"""Every setting of the application, validated once from `serve_config.yaml`'s `args`.

Ray Serve validates the config's `args` into `AppArgs` (the builder is typed), and each deployment
receives only the part it needs. Nothing else in the project reads the environment or keeps
globals: this module is the single source of configuration.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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
    max_decoded_pixels: int | None = Field(
        None, gt=0,
        description="Pixels one image may decode to; larger ones are refused from their header, before any "
        "pixel is decoded. JPEGs count at the reduced scale they decode at (the model keeps no more). None: "
        "16 x max_side^2 (16.8 M at max_side 1024): what is kept after shrinking to max_side, 4 times over "
        "per side.",
    )
    max_decode_pixels_in_flight: int | None = Field(
        None, gt=0,
        description="Pixels a preprocessor replica decodes at once, over all its images; later images wait "
        "their turn, and one larger image decodes alone. Decoding costs up to ~9 bytes per pixel, so this "
        "bounds the replica's decoding memory. None: the per-image limit.",
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

    @property
    def decoded_pixel_limit(self) -> int:
        return self.max_decoded_pixels or 16 * self.max_side**2

    @property
    def decode_pixel_budget(self) -> int:
        return self.max_decode_pixels_in_flight or self.decoded_pixel_limit


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


GptqBackend = Literal["auto", "tinygemm", "splitk", "gemlite", "torch", "torch_int8", "torch_fused", "marlin", "triton", "exllama_v2"]


class QuantizationSettings(_Settings):
    """How quantized weights load and whether the KV cache is quantized (a model YAML's `quantization:`)."""

    gptq_backend: GptqBackend = Field(
        "auto", description="Kernel for GPTQ checkpoints: 'splitk' (our split-K Triton kernel, 4 or 8 bits, CUDA, "
        "the checkpoint's packed layout as it is; engine/quant/splitk_linear.py; auto's choice on CUDA), 'tinygemm' "
        "(PyTorch's int4 matmul, 4 bits; engine/quant/int4_linear.py), 'gemlite' (gemlite's Triton kernels, 4 or 8 bits, CUDA, one copy of the "
        "weights; pip install gemlite) or one of gptqmodel's; 'auto' picks per device and bit width."
    )
    kv_cache: Literal["none", "int8", "int4"] = Field(
        "none",
        description="Quantize the KV cache. int8: the continuous engine keeps its paged cache in 8-bit codes with a "
        "float32 scale per position and head (about half of bf16's bytes), quantized as written and dequantized "
        "in attention; the generate() engine uses transformers' QuantizedCache (HQQ backend; pip install hqq). "
        "int4: the generate() engine only (transformers' QuantizedCache).",
    )
    kv_cache_group_size: int = Field(
        64, ge=8, description="generate() engine only: values sharing one scale in transformers' quantized cache."
    )
    kv_cache_residual_length: int = Field(
        128, ge=0,
        description="generate() engine only: most recent tokens kept in full precision before they are quantized.",
    )


EngineKind = Literal["auto", "generate", "continuous"]


class ContinuousEngineSettings(_Settings):
    """The continuous-batching engine (engine/continuous): slots, buckets, CUDA graphs."""

    max_slots: int = Field(
        32, ge=1, le=1024,
        description="Sequences decoding at once; later arrivals wait for a free slot. A slot holds no KV cache "
        "of its own: sequences take cache blocks as they grow.",
    )
    block_size: int = Field(16, ge=1, le=1024, description="Token positions per KV cache block.")
    decode_attention: Literal["auto", "gather", "triton"] = Field(
        "auto",
        description="The decode step's attention over the paged cache (engine/attention): 'triton' reads each "
        "block in place (CUDA); 'gather' gathers the blocks, then runs PyTorch's SDPA (any device); 'auto': "
        "triton on CUDA, else gather.",
    )
    kv_cache_blocks: int | None = Field(
        None, ge=2,
        description="KV cache blocks (each block_size positions, every layer). None: on a GPU, what "
        "kv_cache_memory_fraction of the memory free after loading holds; elsewhere max_slots full-length sequences.",
    )
    kv_cache_memory_fraction: float = Field(
        0.7, gt=0, le=1,
        description="On a GPU, with kv_cache_blocks unset, the KV cache takes this share of the memory free after "
        "loading the weights.",
    )
    batch_buckets: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
        description="Decode batch sizes with their own CUDA graph; a step runs at the smallest bucket that "
        "holds every active sequence (capped at max_slots).",
    )
    min_length_bucket: int = Field(
        256, ge=16,
        description="Attention reads the cache up to the next power of two of the longest sequence, never less "
        "(a multiple of block_size).",
    )
    max_prefill_tokens: int = Field(
        4096, ge=16,
        description="Prompt tokens (padded) prefilled in one forward pass; longer prompts are prefilled in chunks "
        "of this size, one pass per decode step, and arrivals beyond wait for the next pass. Smaller: earlier "
        "first tokens for the first arrivals of a burst, and shorter pauses of the running sequences (whose "
        "steps wait for each pass); larger: fewer passes.",
    )
    prefix_caching: bool = Field(
        True,
        description="Keep full KV cache blocks by a hash of their tokens (and of the images and the request's "
        "cache_salt behind them) after their sequence ends, until their memory is needed: a prompt that starts "
        "as an earlier one did (the next turn of a conversation) prefills only what follows. The same answers "
        "either way (up to rounding in bf16 or with an int8 KV cache, as with chunked prefill); False: every "
        "prompt is prefilled whole.",
    )
    encoder_cache_bytes: int = Field(
        256 * 2**20, ge=0,
        description="Device memory for vision encoder outputs kept by image content, least recently used "
        "evicted first: an image sent again whose tokens the prefix cache does not hold skips the vision "
        "encoder. 0: off.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Capture decode steps in CUDA graphs, and continued prompt chunks (a chat turn after its "
        "cached prefix, a long prompt's later chunks) at bucketed sizes, each the first time it is needed "
        "(CUDA only).",
    )
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

    @model_validator(mode="after")
    def _spans_whole_blocks(self) -> ContinuousEngineSettings:
        if self.min_length_bucket % self.block_size:
            raise ValueError("min_length_bucket must be a multiple of block_size")
        return self


# Temperatures below this sample greedily (as temperature 0), as vLLM treats them: dividing logits by
# a smaller one overflows to inf and NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


class GenerationDefaults(_Settings):
    """Sampling values for the fields a request leaves out (a model YAML's `generation_defaults:`).

    Each one set here overrides the checkpoint's generation_config.json; one left out keeps the
    checkpoint's value, or OpenAI's default where the checkpoint has none (temperature 1, top_p 1,
    top_k 0, repetition_penalty 1). The "off" values (top_k 0, repetition_penalty 1) undo a
    checkpoint's setting.
    """

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy decoding.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Sample among the k likeliest tokens; 0: all of them.")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=2.0, description="As transformers applies it, over prompt and output tokens; 1: off."
    )

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float | None) -> float | None:
        return 0.0 if value is not None and value < GREEDY_BELOW_TEMPERATURE else value


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
    generation_config: Literal["auto", "none"] = Field(
        "auto",
        description="'auto': the checkpoint's generation_config.json sets the sampling defaults for fields a "
        "request leaves out (temperature, top_p, top_k, repetition_penalty; do_sample false: greedy), as vLLM's "
        "--generation-config auto; 'none': OpenAI's defaults. generation_defaults overrides either.",
    )
    generation_defaults: GenerationDefaults = Field(
        GenerationDefaults(), description="Sampling defaults for fields a request leaves out, over the checkpoint's."
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
    def from_yaml(cls, path: str | Path) -> ModelSettings:
        with open(resolve_path(path), encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f))


_KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What an Authorization header carries intact: printable ASCII without spaces.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class KeySourceError(ValueError):
    """A configured key source that cannot be used: the service refuses to start rather than open."""


class ApiKey(_Settings):
    """One configured key, in the clear (`key`) or as its SHA-256 hex digest (`sha256`), with a name.

    A string stands for an unnamed key: `sha256:HEX` is a digest, anything else is the key itself.
    A string never carries a name, and a clear string key may not contain ':', so that no part of a
    key can be read as a name (a `NAME:KEY` string would let `KEY` alone in). Name keys with the
    mapping form. Unnamed keys are named after where they are configured: `api_keys[0]`,
    `api_keys_file:3` (line 3), `api_keys_env[1]`; names are what rate limits and logs see.
    """

    name: str | None = Field(None, pattern=_KEY_NAME, description="Unique among all keys.")
    key: SecretStr | None = Field(None, description="The key in the clear: printable ASCII, no spaces.")
    sha256: str | None = Field(None, description="The key's SHA-256: 64 hex digits, 'sha256:' prefix allowed.")
    requests_per_minute: int | None = Field(None, ge=1, description="Overrides rate_limits for this key.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Overrides rate_limits for this key.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = SecretStr(value)
        if not isinstance(value, SecretStr):
            return value
        text = value.get_secret_value().strip()
        if text.startswith("sha256:"):
            return {"sha256": text}
        if ":" in text:
            raise ValueError(
                "a key given as a string may not contain ':' (it is never read as NAME:KEY); "
                "name a key with {name: NAME, key: KEY}, or give its digest as 'sha256:HEX'"
            )
        return {"key": SecretStr(text)}

    @field_validator("key")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _HEADER_SAFE.fullmatch(value.get_secret_value()):
            raise ValueError("a key must be printable ASCII without spaces, as an Authorization header carries it")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.strip().removeprefix("sha256:").lower()
        if not _SHA256_HEX.fullmatch(digest):
            raise ValueError(
                f"sha256 must be the 64 hex digits of the key's SHA-256 digest, not {len(digest)} characters "
                "of which some may not be hex (a truncated digest would never match)"
            )
        return digest

    @model_validator(mode="after")
    def _one_form(self) -> ApiKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of `key` and `sha256`")
        return self

    def named(self, name: str) -> ApiKey:
        return self if self.name else self.model_copy(update={"name": name})


def _masked_keys(entries: Any) -> Any:
    """Config entries with every clear key wrapped in SecretStr before validation, so that an error
    about a key (which Ray logs with the application's args) shows it as '**********'."""
    if not isinstance(entries, list):
        return entries
    masked = []
    for entry in entries:
        if isinstance(entry, str):
            entry = SecretStr(entry)
        elif isinstance(entry, dict) and isinstance(entry.get("key"), str):
            entry = {**entry, "key": SecretStr(entry["key"])}
        masked.append(entry)
    return masked


class RateLimitSettings(_Settings):
    """Per API key (per client address when the service is open), over a sliding minute."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    # How the ingress treats a RateLimiter that cannot answer; application-wide, never per key.
    limiter_timeout_s: float = Field(
        2.0, gt=0, le=60,
        description="How long admission waits for the RateLimiter; past it the request gets 503 with Retry-After.",
    )
    fail_open: bool = Field(
        False,
        description="While the RateLimiter cannot answer, admit requests unmetered instead of answering 503.",
    )

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class CorsSettings(_Settings):
    """Which other origins' pages may call the API from a browser. Every answer carries these headers,
    errors (401, 413, 429, 500) included, so such a page can read why it was refused."""

    allow_origins: list[str] = ["*"]
    allow_methods: list[str] = ["*"]
    allow_headers: list[str] = ["*"]
    allow_credentials: bool = False
    max_age_s: int = 600

    @model_validator(mode="after")
    def _no_credentials_for_any_origin(self) -> CorsSettings:
        # Starlette answers a credentialed request from any origin by echoing that origin back.
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials needs explicit allow_origins, not '*'")
        return self


class IngressSettings(_Settings):
    """HTTP-facing policy of the Ingress: keys, rate limits, CORS and request limits."""

    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="Keys as 'KEY', 'sha256:HEX' or {name, key | sha256, requests_per_minute, tokens_per_minute}.",
    )
    api_keys_file: str | None = Field(
        None, description="A file with one key per line ('KEY' or 'sha256:HEX'; blank lines and '#' comments skip)."
    )
    api_keys_env: str | None = Field(None, description="An environment variable with comma-separated keys, same forms.")
    allow_unauthenticated: bool = Field(
        False,
        description="Let the service start open when its configured key sources yield no key. Without it, a "
        "configured source that is empty, unset or unreadable stops the start; with no source at all the "
        "service is open either way.",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Addresses or CIDR networks of the reverse proxies in front of Serve. A request from one of "
        "them is attributed to the address its X-Forwarded-For names (walked right to left, past trusted hops); "
        "from any other peer the header is ignored. Used for per-address rate limits of an open service.",
    )
    api_docs: bool = Field(
        False,
        description="Serve /docs (Swagger UI) and /redoc. They run pinned CDN scripts (with SRI and a strict CSP) on "
        "the chat page's origin, where the page keeps the API key, so they are off unless turned on. "
        "/openapi.json is served either way.",
    )
    rate_limits: RateLimitSettings = RateLimitSettings()
    cors: CorsSettings = CorsSettings()
    max_request_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    max_tokens_ceiling: int = Field(4096, ge=1, description="Largest max_tokens a client may ask.")
    max_messages: int = Field(128, ge=1)
    max_images_per_request: int = Field(8, ge=0)
    max_n: int = Field(
        8, ge=1, le=128,
        description="Most choices (`n`) one request may ask for. The engine prefills the prompt once and "
        "decodes n rows from it, so a request holds n rows of the batch (and n KV cache slots) at once.",
    )
    max_grammar_chars: int = Field(
        65536, ge=64,
        description="Longest JSON schema (or set of forced tools), in characters of compact JSON, that a request "
        "may constrain decoding with: compiling a grammar costs CPU time growing with its size.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _mask_clear_keys(cls, value: Any) -> Any:
        return _masked_keys(value)

    @field_validator("api_keys")
    @classmethod
    def _names_unique(cls, keys: list[ApiKey]) -> list[ApiKey]:
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key.name in seen:
                first = seen[key.name]
                raise ValueError(f"api_keys[{i}] has the name {key.name!r} of api_keys[{first}]; names are unique")
            if key.name:
                seen[key.name] = i
        return keys

    @property
    def rate_limited(self) -> bool:
        """Whether any budget is configured, for everyone or for some key."""
        return self.rate_limits.enabled or any(k.requests_per_minute or k.tokens_per_minute for k in self.api_keys)

    def configured_keys(self) -> list[ApiKey]:
        """Every key of every source, each named and validated; raises KeySourceError for a source that
        cannot be read or yields no key (unless `allow_unauthenticated`), an invalid entry (named by its
        position), or a name or key given twice."""
        keys = [key.named(f"api_keys[{i}]") for i, key in enumerate(self.api_keys)]
        if self.api_keys_file is not None:
            try:
                lines = resolve_path(self.api_keys_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise KeySourceError(f"api_keys_file {self.api_keys_file!r} cannot be read: {exc}") from None
            entries = [(f"api_keys_file:{n}", line) for n, line in enumerate(lines, 1)]
            keys += self._parse_source("api_keys_file", f"{self.api_keys_file!r} has no key", entries, comments=True)
        if self.api_keys_env is not None:
            values = os.environ.get(self.api_keys_env, "").split(",")
            entries = [(f"api_keys_env[{i}]", value) for i, value in enumerate(values)]
            problem = f"names the environment variable {self.api_keys_env}, which is unset or holds no key"
            keys += self._parse_source("api_keys_env", problem, entries, comments=False)
        names: dict[str, str] = {}
        digests: dict[str, str] = {}
        for key in keys:
            name = key.name or ""
            if name in names:
                raise KeySourceError(f"two keys are named {name!r}; names are unique")
            if key.sha256 is not None:
                digest = key.sha256
            else:
                assert key.key is not None
                digest = hashlib.sha256(key.key.get_secret_value().encode()).hexdigest()
            if digest in digests:
                raise KeySourceError(f"key {name!r} is the same key as {digests[digest]!r}; give each key once")
            names[name] = digests[digest] = name
        return keys

    def _parse_source(
        self, source: str, problem: str, entries: list[tuple[str, str]], comments: bool
    ) -> list[ApiKey]:
        keys = []
        for where, text in entries:
            text = text.strip()
            if not text or (comments and text.startswith("#")):
                continue
            try:
                keys.append(ApiKey.model_validate(SecretStr(text)).named(where))
            except ValidationError as exc:
                raise KeySourceError(f"{where}: {'; '.join(e['msg'] for e in exc.errors())}") from None
        if not keys and not self.allow_unauthenticated:
            raise KeySourceError(
                f"{source} {problem}: refusing to start with no key from it (the service would be open). "
                "Provide the keys, remove the source, or set allow_unauthenticated: true."
            )
        return keys


class RoutingSettings(_Settings):
    """How handles pick a VLMServer replica for each request (the deployment's request router)."""

    router: Literal["default", "prefix_affinity"] = Field(
        "default",
        description="'default': Ray Serve's power of two choices (the less loaded of two random replicas). "
        "'prefix_affinity': a conversation's turns go to one replica, chosen by a hash of its first turn "
        "(images included), where its prefix cache is (deployments/affinity_router.py).",
    )
    affinity_queue_bound: int = Field(
        32, ge=1,
        description="prefix_affinity: when a conversation's replica has more requests in flight than this, "
        "the request goes to the least loaded replica instead.",
    )


class AppArgs(_Settings):
    """The `args` of `serve_config.yaml`: everything the application builder needs."""

    model: str = Field("configs/models/demo.yaml", description="Path of the model's YAML config.")
    images: ImageSettings = ImageSettings()
    batching: BatchSettings = BatchSettings()
    ingress: IngressSettings = IngressSettings()
    routing: RoutingSettings = RoutingSettings()

    @field_validator("model")
    @classmethod
    def _model_config_exists(cls, value: str) -> str:
        if not resolve_path(value).is_file():
            raise ValueError(f"model config {value!r} not found")
        return value

    def model_settings(self) -> ModelSettings:
        return ModelSettings.from_yaml(self.model)
