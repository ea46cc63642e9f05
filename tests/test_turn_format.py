"""The turn format (EOT after every utterance), the loss mask, trimming, and epoch batching."""
import json

import numpy as np
import pytest

from lima_jax.data import DataError, epoch_batches, load_examples, read_conversations, tokenize_conversation
from lima_jax.data.formats import Conversation

DIALOG = ("How do I boil an egg?", "Put it in boiling water for nine minutes.", "And a soft one?",
          "Six minutes.")


def conv(*turns, line=1):
    return Conversation(tuple(turns), "test", "train.jsonl", line)


def test_eot_follows_every_utterance_and_only_assistant_tokens_are_targets(toy_tokenizer):
    tok = toy_tokenizer
    dialog = tok.encode_dialog(DIALOG)
    ids, mask = np.array(dialog.ids), np.array(dialog.assistant_mask)
    assert ids[0] == tok.bos_id and not mask[0]
    eot_positions = np.flatnonzero(ids == tok.eot_id)
    assert len(eot_positions) == 4 and eot_positions[-1] == len(ids) - 1
    # segments between EOTs are the utterances, encoded one by one
    bounds = [0, *eot_positions]
    for i, turn in enumerate(DIALOG):
        segment = ids[bounds[i] + 1:bounds[i + 1]]
        assert list(segment) == tok.encode(turn)
        assert mask[bounds[i] + 1:bounds[i + 1] + 1].all() == (i % 2 == 1)  # the EOT shares its turn's mask
        assert not mask[bounds[i] + 1:bounds[i + 1] + 1].any() or i % 2 == 1
    assert tok.decode(tok.encode_dialog(["How do I boil an egg?"]).ids) == "How do I boil an egg?"  # no BOS/EOT
    assert tok.eot_id == tok.backend.sp.get_piece_size() and tok.vocab_size == tok.eot_id + 1
    assert tok.eot_id != tok.eos_id


def test_the_generation_prompt_is_a_prefix_of_the_training_sequence(toy_tokenizer):
    """Training and inference tokenize the same conversation identically (the chat-template trap)."""
    full = toy_tokenizer.encode_dialog(DIALOG).ids
    for user_turns in (1, 3):
        prompt = toy_tokenizer.encode_dialog(DIALOG[:user_turns]).ids
        assert full[:len(prompt)] == prompt and prompt[-1] == toy_tokenizer.eot_id


def test_targets_are_shifted_and_the_assistant_eot_is_trained(toy_tokenizer):
    example = tokenize_conversation(toy_tokenizer, conv(*DIALOG), max_len=256)
    ids = toy_tokenizer.encode_dialog(DIALOG).ids
    np.testing.assert_array_equal(example.tokens, ids[:-1])
    np.testing.assert_array_equal(example.targets, ids[1:])
    trained = example.targets[example.weights > 0]
    assert trained[-1] == toy_tokenizer.eot_id  # the stop signal is a target, never masked out
    assert (trained == toy_tokenizer.eot_id).sum() == 2  # one per assistant turn
    expected = sum(len(toy_tokenizer.encode(t)) + 1 for t in DIALOG[1::2])
    assert example.weights.sum() == expected


def test_loss_on_all_tokens_is_switchable(toy_tokenizer):
    example = tokenize_conversation(toy_tokenizer, conv(*DIALOG), max_len=256, loss_on="all")
    assert example.weights.all()


def test_long_conversations_are_trimmed_to_max_len(toy_tokenizer):
    long = conv("Tell me a story.", "Once upon a time " * 40)
    example = tokenize_conversation(toy_tokenizer, long, max_len=32)
    assert len(example) == 32 and example.trimmed
    assert example.weights.sum() > 0


def test_an_example_with_nothing_to_train_on_is_refused_with_its_line(toy_tokenizer):
    long_prompt = conv("Please read this. " * 40, "Done.", line=17)
    with pytest.raises(DataError, match=r"train.jsonl:17: the loss mask is trimmed"):
        tokenize_conversation(toy_tokenizer, long_prompt, max_len=32)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_three_schemas_give_the_same_conversation(tmp_path):
    records = [
        {"conversations": ["Hi", "Hello!"], "source": "x"},
        {"instruction": "Hi", "response": "Hello!"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]
    convs = read_conversations(write_jsonl(tmp_path / "t.jsonl", records))
    assert [c.turns for c in convs] == [("Hi", "Hello!")] * 3
    assert [c.line for c in convs] == [1, 2, 3]


def test_a_system_message_joins_the_first_user_turn(tmp_path):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}]}
    (conversation,) = read_conversations(write_jsonl(tmp_path / "t.jsonl", [record]))
    assert conversation.turns == ("Be brief.\n\nHi", "Hello!")


@pytest.mark.parametrize("record,message", [
    ('{"conversations": ["Hi", ', "malformed JSON"),
    ({"conversations": ["Hi", ""]}, r"turn 1\)? is empty"),
    ({"conversations": ["Hi", 3]}, r"turn 1\)? is int"),
    ({"conversations": ["Hi", "Hello", "Bye"]}, "must end with the assistant"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "expected 'user'"),
    ({"prompt": "Hi", "completion": "Hello"}, "unknown schema"),
])
def test_bad_records_name_file_and_line(tmp_path, toy_tokenizer, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": ["Hi", "Hello!"]}, record])
    with pytest.raises(DataError, match=message) as error:
        load_examples(str(path), toy_tokenizer, max_len=64)
    assert f"{path}:2:" in str(error.value)


def test_skip_mode_counts_every_bad_record_and_keeps_reading(tmp_path, toy_tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"conversations": ["Hi", "Hello!"]}, "{not json",
                                                   {"conversations": ["Hi"]}, {"conversations": ["A", "B"]}])
    report = load_examples(str(path), toy_tokenizer, max_len=64, on_bad_example="skip")
    assert len(report.examples) == 2 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}:2:") and report.skipped[1].startswith(f"{path}:3:")


def test_epochs_visit_every_example_once_in_a_seeded_order(toy_tokenizer, repo):
    report = load_examples(str(repo / "data" / "toy_lima.jsonl"), toy_tokenizer, max_len=128)
    examples = report.examples
    first_tokens = {tuple(e.tokens[:12]) + (len(e),): i for i, e in enumerate(examples)}

    def visit(epoch, **kw):
        seen = []
        for batch in epoch_batches(examples, batch_size=10, max_len=128, seed=3, epoch=epoch, **kw):
            for row in range(batch["tokens"].shape[0]):
                n = int(batch["segment_ids"][row].sum())
                if n:
                    seen.append(first_tokens[tuple(batch["tokens"][row, :12]) + (n,)])
        return seen

    epoch1 = visit(1)
    assert sorted(epoch1) == list(range(len(examples)))  # 48 examples: 5 batches, the last padded
    assert visit(1) == epoch1 and visit(2) != epoch1
    host0, host1 = visit(1, process_count=2, process_index=0), visit(1, process_count=2, process_index=1)
    assert sorted(host0 + host1) == sorted(epoch1) and not set(host0) & set(host1)
    assert visit(1, start_step=2) == epoch1[20:]  # resuming mid-epoch: exactly the rest


def test_an_explicit_schema_that_does_not_match_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Hi", "response": "Hello!"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: schema 'lima' was asked for"):
        read_conversations(path, schema="lima")


def test_a_file_that_is_not_sentencepiece_is_named(tmp_path):
    from lima_jax.tokenizer import Tokenizer
    bogus = tmp_path / "tokenizer.model"
    bogus.write_text("not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer(bogus)


def test_the_data_cli_tokenizer_commands_rebuild_and_show_the_toy_tokenizer(tmp_path, repo, toy_tokenizer, capsys):
    """`python -m lima_jax.data tokenizer train|encode` (the CLI that was `python -m lima_jax.tokenizer`)."""
    from lima_jax.data import __main__ as data_cli
    from lima_jax.tokenizer import Tokenizer
    out = tmp_path / "new" / "tok.model"
    assert data_cli.main(["tokenizer", "train", "--input", str(repo / "data" / "toy_lima.jsonl"),
                          "--output", str(out)]) == 0
    rebuilt = Tokenizer(out)
    assert rebuilt.vocab_size == toy_tokenizer.vocab_size == 513  # 512 pieces + EOT
    pieces = [rebuilt.backend.sp.id_to_piece(i) for i in range(rebuilt.eot_id)]
    assert pieces == [toy_tokenizer.backend.sp.id_to_piece(i) for i in range(toy_tokenizer.eot_id)]
    capsys.readouterr()
    assert data_cli.main(["tokenizer", "encode", "--tokenizer", str(out), '["Hi", "Hello!"]']) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    dialog = toy_tokenizer.encode_dialog(["Hi", "Hello!"])
    assert [int(r[0]) for r in rows] == dialog.ids
    assert [r[1] == "T" for r in rows] == dialog.assistant_mask
    assert rows[0][2] == "<s>" and rows[-1] == [str(toy_tokenizer.eot_id), "T", "<eot>"]
    with pytest.raises(DataError, match="expected a JSON list of strings"):
        data_cli.main(["tokenizer", "encode", "--tokenizer", str(out), '{"a": 1}'])
