"""Sampling defaults come from the served model: the demo checkpoint's generation_config.json is greedy.

The default application under `serve run`, called with the official openai client.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.support.images import MODEL, data_url, png_bytes

pytestmark = pytest.mark.integration


def test_models_show_the_generation_defaults(client: OpenAI) -> None:
    models = list(client.models.list())
    assert len(models) >= 2  # the model and its aliases
    for model in models:
        # the demo's generation_config.json says do_sample: false; its YAML's default_max_tokens is 128
        assert model.generation_defaults == {"temperature": 0.0, "max_tokens": 128}
    assert client.models.retrieve(MODEL).generation_defaults == {"temperature": 0.0, "max_tokens": 128}


def test_a_request_without_sampling_fields_decodes_greedily(client: OpenAI) -> None:
    content = [{"type": "text", "text": "What color is the shape?"},
               {"type": "image_url", "image_url": {"url": data_url(png_bytes((200, 120), (90, 160, 40)))}}]
    messages = [{"role": "user", "content": content}]

    def answer(**sampling) -> str:
        # Past its end of sequence the model is unsure of every token, so sampling there (OpenAI's
        # default temperature 1) would take a different way each time; greedy decoding cannot.
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64,
                                               extra_body={"ignore_eos": True}, **sampling)
        return reply.choices[0].message.content

    left_out = [answer() for _ in range(3)]
    assert left_out[0] and left_out == [left_out[0]] * 3
    assert left_out[0] == answer(temperature=0)
    # a request that sets the field still gets what it asks for
    assert any(answer(temperature=1.0, seed=seed) != left_out[0] for seed in range(3))
