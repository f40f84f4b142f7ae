"""GPTQ end to end on CPU: `vlm-serve quantize` the demo model, load it, compare it, serve it.

The quantize command runs the way a user runs it (a subprocess), with a small bounded calibration
set; the checkpoint loads with `AutoModelForImageTextToText.from_pretrained`, and `serve run`
serves it with the openai client as the judge.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.serving import ROOT, config_for_tests, free_port, start_server

pytest.importorskip("gptqmodel", reason="GPTQ needs `pip install gptqmodel optimum`")
pytest.importorskip("optimum", reason="GPTQ needs `pip install gptqmodel optimum`")

TRAINED = ROOT / "checkpoints" / "glm4v-demo-vqa"
CALIBRATION = 16  # samples: bounded, so CI quantizes in well under a minute of GPTQ work
BACKEND = {8: "torch_int8", 4: "torch_fused"}  # the CPU kernels the demo configs name


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The float demo checkpoint: the trained one when it exists, else the seeded random one."""
    if (TRAINED / "config.json").exists():
        return TRAINED
    from demo.model import make_demo_model

    return Path(make_demo_model(tmp_path_factory.mktemp("demo") / "glm4v-demo"))


@pytest.fixture(scope="module")
def quantized(source: Path, tmp_path_factory: pytest.TempPathFactory):
    made: dict[int, Path] = {}

    def get(bits: int) -> Path:
        if bits not in made:
            out = tmp_path_factory.mktemp(f"gptq{bits}") / f"glm4v-demo-gptq{bits}"
            command = [
                sys.executable, "-m", "serve_app.cli.quantize", "--model", str(source), "--bits", str(bits),
                "--group-size", "32", "--calibration", str(CALIBRATION), "--calibration-seed", "0",
                "--backend", BACKEND[bits], "--out", str(out),
            ]  # fmt: skip
            done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            made[bits] = out
        return made[bits]

    return get


def _held_out_batches(processor, n: int = 4) -> list[dict]:
    from serve_app.cli.quantize import CalibrationSample, encode_calibration

    try:
        from demo.vqa_data import generate

        samples = [CalibrationSample(s.image, s.question, s.answer) for s in generate("test", n)]
    except ImportError:
        from serve_app.cli.quantize import calibration_samples

        samples = calibration_samples(n, seed=12345)
    return encode_calibration(processor, samples)


def _logit_cosine(source: Path, checkpoint: Path) -> float:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from engine.quant.gptq import load_kwargs

    processor = AutoProcessor.from_pretrained(checkpoint)
    reference = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    kwargs = load_kwargs(checkpoint, torch.device("cpu"))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()
    cosines = []
    with torch.inference_mode():
        for batch in _held_out_batches(processor):
            a, b = reference(**batch).logits[0].float(), model(**batch).logits[0].float()
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item())
    return sum(cosines) / len(cosines)


def _check_checkpoint(checkpoint: Path, bits: int) -> None:
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", bits, 32)
    assert quant["block_name_to_quantize"] == "model.language_model.layers"
    assert (checkpoint / "processor_config.json").exists() and (checkpoint / "tokenizer.json").exists()
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # The fused MLP projection is quantized as one module (what transformers' Glm4v expects) ...
        assert "model.language_model.layers.0.mlp.gate_up_proj.qweight" in keys
        assert "model.language_model.layers.0.self_attn.q_proj.qweight" in keys
        # ... and the vision tower stays in float.
        assert not any(k.startswith("model.visual") and k.endswith("qweight") for k in keys)
        assert f.get_tensor("model.visual.blocks.0.attn.qkv.weight").dtype == torch.float32
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert size < 20 * 2**20


def test_8bit_checkpoint_keeps_logits_close(source: Path, quantized) -> None:
    checkpoint = quantized(8)
    _check_checkpoint(checkpoint, 8)
    assert _logit_cosine(source, checkpoint) >= 0.99


def test_4bit_checkpoint_loads_and_stays_close(source: Path, quantized) -> None:
    checkpoint = quantized(4)
    _check_checkpoint(checkpoint, 4)
    assert _logit_cosine(source, checkpoint) >= 0.95


def test_tinygemm_serves_the_4bit_checkpoint_as_gptqmodel_computes_it(quantized) -> None:
    """The GPU's default for 4 bits (engine/quant/int4_linear.py), on its CPU twin: every decoder linear
    repacked, logits as gptqmodel's own kernel gives them, and the continuous engine (whose decode step
    the GPU compiles) answering as generate() does on the repacked model."""
    from engine.continuous.engine import ContinuousEngine
    from engine.generate.engine import GenerateEngine
    from engine.loader import load_model
    from engine.quant.int4_linear import Int4Linear
    from serve_app.settings import ContinuousEngineSettings, ModelSettings, QuantizationSettings
    from tests.engine.test_engine import preprocessed, run, user_request

    def load(backend: str) -> GenerateEngine:
        settings = ModelSettings(id="gptq4", path=str(quantized(4)), max_model_len=512, engine="generate",
                                 quantization=QuantizationSettings(gptq_backend=backend))
        return GenerateEngine(load_model(settings))

    plain, repacked = load("torch"), load("tinygemm")
    layers = repacked.loaded.model.model.language_model.layers
    linears = [m for m in layers.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 6 * len(layers)  # q, k, v, o, gate_up, down
    assert not any(hasattr(m, "qweight") for m in layers.modules())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = plain.loaded.model(input_ids=ids).logits, repacked.loaded.model(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()

    requests = [
        user_request(repacked, "What shape is this?", preprocessed(repacked, (112, 112), (255, 0, 0)), max_tokens=8),
        user_request(repacked, "Say hello.", None, max_tokens=5),
    ]
    cengine = ContinuousEngine(repacked.loaded.with_settings(continuous=ContinuousEngineSettings(max_slots=2)))
    try:
        def graph_breaks() -> int:  # all slots inactive: the traced step changes nothing
            decoder = cengine.runner.decoder
            step = torch._dynamo.explain(decoder.step)
            return step(cengine.runner.state.active[:2], decoder.span_ids[:256], False).graph_break_count

        assert cengine.call(graph_breaks) == 0  # tinygemm's op traces: the GPU can compile and capture it
        assert run(cengine, requests) == run(repacked, requests)
    finally:
        for engine in (cengine, plain, repacked):
            engine.close()


ACCURACY_SAMPLES = 100  # held-out test questions, 20 per type
# Answer accuracy may fall at most 2 points (8-bit) or 5 points (4-bit) under float's.
ACCURACY_FLOOR = {8: 0.02, 4: 0.05}


def _accuracy(checkpoint: Path) -> float:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from demo.evaluate import evaluate_offline
    from engine.quant.gptq import load_kwargs

    processor = AutoProcessor.from_pretrained(checkpoint)
    kwargs = load_kwargs(checkpoint, torch.device("cpu"))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()
    return evaluate_offline(model, processor, split="test", n=ACCURACY_SAMPLES, batch_size=25)["overall"]


@pytest.mark.skipif(not (TRAINED / "config.json").exists(), reason="needs the trained demo checkpoint")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_answer_accuracy_stays_within_the_floor(bits: int, source: Path, quantized) -> None:
    reference = _accuracy(source)
    assert reference >= 0.9  # the trained model itself, so the comparison means something
    assert _accuracy(quantized(bits)) >= reference - ACCURACY_FLOOR[bits]


@pytest.mark.integration
# 4 bits only: the 8-bit checkpoint loads through the same engine code (its logits and accuracy are
# checked above), and each `serve run` here costs a minute of CI.
@pytest.mark.parametrize("bits", [4])
def test_serve_run_serves_the_quantized_model(bits: int, quantized, tmp_path: Path) -> None:
    from openai import OpenAI

    from tests.support.images import data_url, png_bytes

    model_config = yaml.safe_load((ROOT / f"configs/models/demo-gptq{bits}.yaml").read_text())
    model_config["path"] = str(quantized(bits))
    model_yaml = tmp_path / f"demo-gptq{bits}.yaml"
    model_yaml.write_text(yaml.safe_dump(model_config))

    server = start_server(tmp_path, config_for_tests(free_port(), overrides={"model": str(model_yaml)}))
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        listed = client.models.retrieve(model_config["id"])
        assert listed.id == model_config["id"]
        # The engine must describe it with engine.quant.gptq.describe_quantization (see there).
        assert getattr(listed, "quantization", None) == f"gptq-{bits}bit"
        reply = client.chat.completions.create(
            model=model_config["id"],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes((112, 112)))}},
                        {"type": "text", "text": "What shape is this?"},
                    ],
                }
            ],
            max_tokens=6,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 1 <= reply.usage.completion_tokens <= 6
        assert reply.usage.prompt_tokens > 16
    finally:
        server.stop()


def test_load_and_generation_kwargs(quantized, source: Path) -> None:
    from transformers import GPTQConfig

    from engine.quant.gptq import QuantizationSettings, describe_quantization, generation_kwargs, load_kwargs

    assert load_kwargs(source, torch.device("cpu")) == {}  # float checkpoints load as before
    cpu8 = load_kwargs(quantized(8), torch.device("cpu"))
    assert cpu8["quantization_config"].backend == "gptq_torch_int8" and "device_map" not in cpu8
    for bits in (4, 8):  # the plain layout, handed to the split-K kernel after loading
        gpu = load_kwargs(quantized(bits), torch.device("cuda"))
        assert gpu["quantization_config"].backend == "gptq_torch" and gpu["device_map"] == {"": "cuda:0"}
    marlin = load_kwargs(quantized(8), torch.device("cuda"), QuantizationSettings(gptq_backend="marlin"))
    assert marlin["quantization_config"].backend == "gptq_marlin"
    chosen = load_kwargs(quantized(8), torch.device("cuda:1"), QuantizationSettings(gptq_backend="triton"))
    assert chosen["quantization_config"].backend == "gptq_triton" and chosen["device_map"] == {"": "cuda:1"}
    assert generation_kwargs(QuantizationSettings()) == {}
    kv = generation_kwargs(QuantizationSettings(kv_cache="int8"))
    assert kv["cache_implementation"] == "quantized" and kv["cache_config"]["nbits"] == 8
    config = json.loads((quantized(4) / "config.json").read_text())["quantization_config"]
    assert describe_quantization(config) == "gptq-4bit"
    assert describe_quantization(GPTQConfig(bits=8)) == "gptq-8bit"  # the enum-valued quant_method


@pytest.mark.skipif(not (TRAINED / "config.json").exists(), reason="needs the trained demo checkpoint")
def test_int8_kv_cache_holds_fewer_bytes_and_keeps_the_answer(tmp_path: Path) -> None:
    pytest.importorskip("hqq", reason="the quantized KV cache needs `pip install hqq`")
    out = tmp_path / "kv.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/kv_cache_memory.py", "--new-tokens", "300", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["kv_cache"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["none"]["bytes_per_token"] == 3 * 2 * 2 * 64 * 2  # layers x (K, V) x heads x dim x bf16
    assert rows["int8"]["cache_type"] == "QuantizedCache"
    # 300 new tokens, the last <128 in full precision: well under the bf16 cache, above 8 bits a value.
    assert 0.5 < rows["int8"]["ratio"] < 0.8 and rows["int4"]["ratio"] < rows["int8"]["ratio"]
    assert rows["int8"]["equal_tokens"] >= 8  # the answer itself, before the forced continuation
