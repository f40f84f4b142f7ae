"""A request's stream of n choices, as deployments/choice_tally.py reads it."""

from deployments.choice_tally import ChoiceTally
from serve_app.stage_types import GenerationChunk


def test_the_tally_is_zero_before_any_chunk_and_finished_only_with_every_choice() -> None:
    tally = ChoiceTally(2)
    assert tally.usage().total_tokens == 0 and not tally.finished
    tally.add(GenerationChunk("a", prompt_tokens=5, completion_tokens=3, finish_reason="length", choice=1))
    assert not tally.finished and tally.usage().total_tokens == 5 + 3
    tally.add(GenerationChunk("b", prompt_tokens=5, completion_tokens=1, finish_reason="stop", choice=0))
    assert tally.finished and (tally.usage().prompt_tokens, tally.usage().completion_tokens) == (5, 4)
