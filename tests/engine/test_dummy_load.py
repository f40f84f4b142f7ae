"""`load_format: dummy` (a checkpoint's shape with random weights, as vLLM's --load-format dummy)
and benchmarks/glm46v_shape.py, which writes GLM-4.6V-Flash's shape without weights: what the
end-to-end GPU benchmark (tools/device_e2e.sh) serves. Here at a CPU's size."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.glm46v_shape import save_shape
from demo.model import build_tokenizer
from engine.factory import load_engine
from serve_app.settings import ModelSettings
from tests.engine.test_engine import preprocessed, run, user_request


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shape") / "glm46v-tiny"
    save_shape(out, tiny=True)
    return out


def test_the_shape_directory_has_a_config_processor_and_tokenizer_but_no_weights(shape_dir: Path) -> None:
    names = {p.name for p in shape_dir.iterdir()}
    assert {"config.json", "processor_config.json", "tokenizer.json", "generation_config.json"} <= names
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))]


def test_every_id_the_model_can_emit_decodes_to_text_and_prompts_encode_as_before(shape_dir: Path) -> None:
    engine = load(shape_dir, engine="generate")
    engine.close()
    engine_tokenizer = engine.loaded.tokenizer
    prompt = "Describe this image <|image|> in detail."
    assert engine_tokenizer(prompt)["input_ids"] == build_tokenizer()(prompt)["input_ids"]
    assert len(engine_tokenizer) == 151552
    assert engine_tokenizer.decode([5000, 151551]) == " t5000 t151551"


def load(shape_dir: Path, **update):
    settings = ModelSettings(id="glm46v-shape", path=str(shape_dir), load_format="dummy", device="cpu",
                             dtype="float32", max_model_len=2048, **update)
    return load_engine(settings)


def test_a_dummy_checkpoint_serves_random_weights_through_the_continuous_engine(shape_dir: Path) -> None:
    engine = load(shape_dir)
    try:
        assert type(engine).__name__ == "ContinuousEngine"
        assert sum(p.numel() for p in engine.loaded.model.parameters()) > 50_000_000  # the 151,552-wide vocabulary
        image = preprocessed(engine, (448, 448), (10, 200, 30))
        assert image.tokens == 256  # GLM-4.6V's default image processor: 448x448 -> 256 tokens
        [(text, finish, tokens)] = run(engine, [user_request(engine, "Describe this image.", image, max_tokens=6,
                                                             ignore_eos=True)])
        assert (finish, tokens) == ("length", 6)
        assert text.strip()  # random tokens still stream as visible text
    finally:
        engine.close()


def test_random_weights_differ_from_load_to_load_unless_seeded_elsewhere(shape_dir: Path) -> None:
    """Nothing is read from disk: two loads make two independently initialised models."""
    first, second = load(shape_dir, engine="generate"), load(shape_dir, engine="generate")
    first.close()
    second.close()
    a = first.loaded.model.lm_head.weight
    b = second.loaded.model.lm_head.weight
    assert a.shape == b.shape and not a.equal(b)
