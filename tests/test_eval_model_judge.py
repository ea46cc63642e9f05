"""The lima_jax model as the pairwise judge (a toy random model: its verdicts are unreadable, so ties)."""
import jax
import pytest

from lima_jax.evaluation import judge, pairs
from lima_jax.generation import SamplingConfig
from tests.test_generate import _generator, _toy


@pytest.fixture(scope="module")
def toy():
    return _toy(jax.devices()[:1])


def test_lima_jax_judge_answers_both_orders_and_unreadable_verdicts_are_ties(toy, tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text('{"prompt": "Hi", "response": "Hello!"}\n{"prompt": "Sum?", "response": "2"}\n')
    b.write_text('{"prompt": "Sum?", "response": "3"}\n{"prompt": "Hi", "response": "Hey."}\n')
    template = tmp_path / "short.txt"
    template.write_text("Q: {question}\n1: {response_1}\n2: {response_2}\nVerdict:")
    greedy = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=6)  # what `lima_jax.eval` passes
    model_judge = judge.LimaJaxJudge(_generator(toy), greedy)
    prompts = []
    original = model_judge.complete
    model_judge.complete = lambda batch: prompts.extend(batch) or original(batch)
    with pairs.JudgmentStore(tmp_path / "j.jsonl", "a", "b") as store:
        assert judge.judge_pairs(pairs.make_pairs(a, b), store, model_judge, judge.load_template(template),
                                 log=lambda _: None) == 2
    assert "1: Hello!\n2: Hey." in prompts[0] and "1: Hey.\n2: Hello!" in prompts[1]
    records = pairs.read_judgments(tmp_path / "j.jsonl")
    assert [len(r["verdicts"]) for r in records] == [2, 2]
    assert all(r["winner"] == "tie" and r["unparsed"] == 2 for r in records)
    assert all(isinstance(v["answer"], str) for r in records for v in r["verdicts"])
