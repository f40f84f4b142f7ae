"""Sampling defaults from a checkpoint's generation_config.json, overridden by the model YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.generation_defaults import resolve_generation_defaults
from serve_app.settings import GenerationDefaults, ModelSettings

DEMO = ModelSettings.from_yaml("configs/models/demo.yaml")


def checkpoint(tmp_path: Path, generation_config: dict | None) -> Path:
    """A directory with just what the defaults are read from (no weights are needed)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path


def model(path: Path, **fields) -> ModelSettings:
    return ModelSettings.model_validate({"id": "m", "path": str(path), **fields})


def resolved(settings: ModelSettings) -> dict:
    return resolve_generation_defaults(settings).model_dump(exclude_none=True)


def test_the_checkpoints_sampling_values_become_the_defaults(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "top_k": 20,
                                 "repetition_penalty": 1.1, "eos_token_id": [2, 3]})
    assert resolved(model(path)) == {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


def test_do_sample_false_means_greedy(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, {"do_sample": False, "temperature": 0.6, "top_p": 0.8})
    assert resolved(model(path)) == {"temperature": 0.0, "top_p": 0.8}


def test_only_what_the_file_states_counts_not_transformers_own_defaults(tmp_path: Path) -> None:
    assert resolved(model(checkpoint(tmp_path / "eos", {"eos_token_id": 2, "max_length": 20}))) == {}
    assert resolved(model(checkpoint(tmp_path / "none", None))) == {}


def test_the_model_yaml_overrides_the_checkpoint_field_by_field(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "top_k": 20})
    settings = ModelSettings.model_validate(yaml.safe_load(
        f"id: m\npath: {path}\ngeneration_defaults:\n  temperature: 0.2\n  top_k: 0\n  repetition_penalty: 1.05\n"
    ))
    assert resolved(settings) == {"temperature": 0.2, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.05}


def test_generation_config_none_ignores_the_file(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, {"do_sample": True, "temperature": 0.6})
    assert resolved(model(path, generation_config="none")) == {}
    assert resolved(model(path, generation_config="none", generation_defaults={"top_p": 0.9})) == {"top_p": 0.9}


def test_a_checkpoint_value_out_of_range_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, {"do_sample": True, "temperature": 7.0, "top_p": 0.8})
    with pytest.raises(ValueError, match="generation_defaults"):
        resolve_generation_defaults(model(path))
    # overriding the refused value, or skipping the file, serves the model
    assert resolved(model(path, generation_defaults={"temperature": 0.7})) == {"temperature": 0.7, "top_p": 0.8}
    assert resolved(model(path, generation_config="none")) == {}


def test_yaml_values_are_validated() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"repetition_penalty": 0}, {"seed": 1}):
        with pytest.raises(ValueError):
            GenerationDefaults.model_validate(bad)
    assert GenerationDefaults(temperature=1e-9).temperature == 0.0


def test_the_demo_checkpoint_ships_greedy_defaults() -> None:
    assert resolved(DEMO)["temperature"] == 0.0
