"""FineTome rows -> messages -> labels: standardisation, every kind of bad row, filters, masking."""

import json

import pytest
from conftest import SAMPLE, run_cli

from train.conversations import (
    IGNORE_INDEX,
    BadRow,
    DataError,
    assistant_spans,
    prepare,
    read_rows,
    split_rows,
    standardize_row,
    tokenize_conversation,
)
from train.prepared import tokenize_rows


def sharegpt(*turns, **extra):
    return {"conversations": [{"from": role, "value": text} for role, text in turns], **extra}


def test_sharegpt_and_messages_forms_standardise_alike():
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert standardize_row(sharegpt(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."))) == expected
    assert standardize_row({"messages": expected}) == expected


@pytest.mark.parametrize("row,reason", [
    ({"source": "x"}, "missing field 'conversations'"),
    ({"conversations": []}, "empty or not a list"),
    ({"conversations": [{"value": "hi"}, {"from": "gpt", "value": "yo"}]}, "turn 0 has no 'from'"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "yo"}]}, "turn 0 has no 'value'"),
    (sharegpt(("narrator", "Once"), ("gpt", "upon")), "unknown role 'narrator'"),
    (sharegpt(("human", "   "), ("gpt", "yo")), "turn 0 has empty text"),
    (sharegpt(("human", "Hi"), ("human", "Hello?")), "no assistant (gpt) turn"),
    (sharegpt(("gpt", "Hello"), ("human", "Hi"), ("gpt", "yo")), "wrong order: expected a user turn at position 0"),
    (sharegpt(("human", "Hi"), ("system", "Be brief"), ("gpt", "yo")), "a system turn may only come first"),
    (sharegpt(("human", "Hi"), ("gpt", "yo"), ("human", "more?")), "ends with a user turn"),
    ("just a string", "not an object"),
])
def test_bad_rows_are_named(row, reason):
    with pytest.raises(BadRow) as caught:
        standardize_row(row)
    assert reason in str(caught.value)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_bad_rows_are_skipped_and_reported_with_row_numbers(tmp_path):
    good = sharegpt(("human", "Hi"), ("gpt", "Hello."), score=4.0)
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, "{not json", sharegpt(("human", "Hi")), good,
                                                   {"conversations": [{"from": "bot", "value": "x"}]}, good])
    prepared = prepare(path, seed=1)
    assert len(prepared.train) == 3 and prepared.total_rows == 6
    assert [number for number, _ in prepared.skipped] == [2, 3, 5]
    assert "unparseable JSON" in prepared.skipped[0][1]
    summary = "\n".join(prepared.summary())
    assert "skipped 3 bad rows" in summary and "row 2: unparseable JSON" in summary


def test_no_good_rows_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", sharegpt(("human", "Hi"))])
    with pytest.raises(DataError, match="no usable conversations: all 2 rows were bad .first: row 1"):
        prepare(path, seed=1)
    with pytest.raises(DataError, match="not found"):
        list(read_rows(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="not found"):
        prepare(tmp_path / "absent.jsonl", seed=1)


def test_json_and_parquet_files_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [sharegpt(("human", f"Q{i}"), ("gpt", f"A{i}"), source="s", score=4.0 + i / 10) for i in range(5)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    from_json = prepare(tmp_path / "rows.json", seed=3)
    from_parquet = prepare(tmp_path / "rows.parquet", seed=3)
    from_jsonl = prepare(tmp_path / "rows.jsonl", seed=3)
    assert from_json.train == from_parquet.train == from_jsonl.train and len(from_json.train) == 5


def test_arrow_rows_mixing_the_two_spellings_standardise(tmp_path):
    # In Parquet every turn carries every field of the column's struct; a spelling a turn does not use is None.
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"conversations": [{"from": "human", "value": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    pq.write_table(pa.Table.from_pylist([row, row]), tmp_path / "mixed.parquet")
    assert prepare(tmp_path / "mixed.parquet", seed=1).train == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]] * 2


def test_shuffle_split_filters_are_deterministic():
    a = prepare(SAMPLE, seed=3407, eval_samples=10, max_samples=50)
    b = prepare(SAMPLE, seed=3407, eval_samples=10, max_samples=50)
    c = prepare(SAMPLE, seed=1, eval_samples=10, max_samples=50)
    assert a.train == b.train and a.eval == b.eval and a.train != c.train
    assert len(a.train) == 50 and len(a.eval) == 10
    assert not any(conversation in a.train for conversation in a.eval)
    # --max-samples never moves a conversation between eval and train
    assert prepare(SAMPLE, seed=3407, eval_samples=10).eval == a.eval
    scored = prepare(SAMPLE, seed=3407, min_score=3.5)
    rows = list(read_rows(SAMPLE))
    assert scored.below_min_score >= 5 and len(scored.train) == len(rows) - scored.below_min_score
    assert all(row["score"] >= 3.5 for _, row in rows if standardize_row(row) in scored.train)


def test_split_orders_rows_as_shuffling_the_conversations_did():
    # Earlier versions shuffled the list of conversations itself; runs and eval splits made then must not move.
    import random

    conversations = [standardize_row(row) for _, row in read_rows(SAMPLE)]
    reference = list(conversations)
    random.Random(3407).shuffle(reference)
    prepared = prepare(SAMPLE, seed=3407, eval_samples=10)
    assert prepared.eval == reference[:10] and prepared.train == reference[10:]
    eval_rows, train_rows = split_rows([5, 7, 9], seed=0, eval_samples=5)  # always one left to train on
    assert len(eval_rows) == 2 and len(train_rows) == 1 and sorted(eval_rows + train_rows) == [5, 7, 9]


def test_blank_lines_are_not_rows_and_row_numbers_are_line_numbers(tmp_path):
    good = sharegpt(("human", "Hi"), ("gpt", "Hello."))
    path = write_jsonl(tmp_path / "gaps.jsonl", [good, "", "   ", "{bad", good])
    prepared = prepare(path, seed=1)
    assert prepared.total_rows == 3 and prepared.skipped[0][0] == 4
    assert [number for number, _ in read_rows(path)] == [1, 4, 5]


def test_a_large_file_is_scanned_in_parallel_with_the_same_result(tmp_path, monkeypatch):
    from train import conversations as data

    rows = [row for _, row in read_rows(SAMPLE)]
    lines = [json.dumps(rows[i % len(rows)]) if i % 97 else "{broken" for i in range(1, 2001)]
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    serial = prepare(path, seed=5, eval_samples=20)
    monkeypatch.setattr(data, "PARALLEL_FROM", 100)
    monkeypatch.setattr(data, "usable_cpus", lambda: 2)
    assert data.worker_count(2000) == 2
    parallel = prepare(path, seed=5, eval_samples=20)
    assert parallel.train_rows == serial.train_rows and parallel.eval_rows == serial.eval_rows
    assert parallel.skipped == serial.skipped and len(serial.skipped) == 20


def test_shipped_sample_is_clean_and_varied():
    rows = [row for _, row in read_rows(SAMPLE)]
    assert len(rows) >= 100
    conversations = [standardize_row(row) for row in rows]  # raises on any bad row
    assert sum(sum(m["role"] == "assistant" for m in c) >= 2 for c in conversations) >= 20
    assert sum(c[0]["role"] == "system" for c in conversations) >= 5
    assert all({"source", "score"} <= set(row) for row in rows)


def masked_by_hand(tokenizer, messages):
    """Independent reference: tokenize the rendered pieces one by one and mark assistant pieces."""
    from train.conversations import TEMPLATE_DATE

    ids, labels, rendered = [], [], ""
    for index, message in enumerate(messages):
        header = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True,
                                               date_string=TEMPLATE_DATE) if message["role"] == "assistant" else None
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False, date_string=TEMPLATE_DATE)
        if header is not None:
            prompt_piece = tokenizer(header[len(rendered):], add_special_tokens=False)["input_ids"]
            answer_piece = tokenizer(upto[len(header):], add_special_tokens=False)["input_ids"]
            ids += prompt_piece + answer_piece
            labels += [IGNORE_INDEX] * len(prompt_piece) + answer_piece
        else:
            piece = tokenizer(upto[len(rendered):], add_special_tokens=False)["input_ids"]
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        rendered = upto
    return ids, labels


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Answer as a pirate."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Ahoy, matey!"}, {"role": "user", "content": "Où est le café ?"},
     {"role": "assistant", "content": "  Yonder, past the 中文 sign.  "}, {"role": "user", "content": "Code?"},
     {"role": "assistant", "content": "```python\nprint('hi')\n```"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_labels_are_ignored_exactly_on_non_assistant_tokens(tokenizer, messages):
    example = tokenize_conversation(messages, tokenizer)
    ids, labels = masked_by_hand(tokenizer, messages)
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # What is trained on, decoded: every assistant answer (trimmed by the template) followed by <|eot_id|>.
    runs, current = [], []
    for token, label in zip(ids, example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    answers = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == answers


def test_assistant_spans_cover_answers_not_headers(tokenizer):
    text, spans = assistant_spans(tokenizer, CONVERSATIONS[0])
    assert [text[a:b] for a, b in spans] == ["4.<|eot_id|>"]


def test_truncation_keeps_the_start_and_drops_conversations_left_without_answers(tokenizer, tmp_path):
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "two.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": long_prompt}])
    prepared = prepare(path, seed=1)
    examples, truncated, dropped = tokenize_rows(prepared, [0, 1], tokenizer, max_seq_length=128, key="t")
    assert (len(examples), truncated, dropped) == (1, 1, 1)
    assert examples[0] == tokenize_conversation(CONVERSATIONS[0], tokenizer)


def test_cli_reports_bad_rows_and_fails_cleanly_without_good_ones(tmp_path, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", sharegpt(("human", "Hi")), {"x": 1}])
    result = run_cli("train/run.py", "--preset", "tiny", "--dataset", str(bad), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no usable conversations: all 3 rows were bad (first: row 1: unparseable JSON "
        "(Expecting property name enclosed in double quotes at column 2))"]
