"""Preference data: loading, TRL format validation with clear errors, tokenization, empty completions."""

import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import trl.data_utils  # the data helpers target TRL's dataset formats

from alignment import data, synthetic

MSG = [{"role": "user", "content": "hi"}]
ANS = [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("example", "kind"),
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),
        ({"prompt": MSG, "chosen": ANS, "rejected": ANS}, "conversational"),
        ({"chosen": "p a", "rejected": "p b"}, "implicit_standard"),
        ({"chosen": MSG + ANS, "rejected": MSG + ANS}, "implicit_conversational"),
    ],
)
def test_detect_format(example, kind):
    assert data.detect_format(example) == kind


def test_missing_field_is_named_with_accepted_formats():
    ds = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "answer": ["b"]})
    with pytest.raises(ValueError) as e:
        data.validate_preference_dataset(ds, name="train_dataset")
    msg = str(e.value)
    assert "train_dataset" in msg and "['rejected']" in msg
    assert (
        "standard (prompt, chosen, rejected: strings)" in msg
        and "conversational" in msg
        and "implicit" in msg
    )


def test_wrong_types_and_mixed_rows():
    with pytest.raises(ValueError, match="row 0: field 'prompt' must be a string"):
        data.validate_preference_dataset([{"prompt": 3, "chosen": "a", "rejected": "b"}], name="d")
    with pytest.raises(ValueError, match="'chosen' and 'rejected' must both be strings"):
        data.validate_preference_dataset([{"prompt": "p", "chosen": "a", "rejected": ANS}], name="d")
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"chosen": "p a", "rejected": "p b"}]
    with pytest.raises(ValueError, match="row 1 is implicit_standard but row 0 is standard"):
        data.validate_preference_dataset(rows, name="d")
    with pytest.raises(ValueError, match="row 0: field 'chosen' is null"):
        data.validate_preference_dataset([{"prompt": "p", "chosen": None, "rejected": "b"}], name="d")
    with pytest.raises(ValueError, match="d is empty"):
        data.validate_preference_dataset(
            datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), name="d"
        )


def test_missing_group_column():
    ds = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "group": ["x"]})
    assert data.validate_preference_dataset(ds, group_column="group") == "standard"
    with pytest.raises(ValueError, match="group_column='annotator' is not a column of dataset"):
        data.validate_preference_dataset(ds, group_column="annotator")


def test_load_jsonl_and_disk(tmp_path):
    ds = synthetic.pluralistic_task(12, 2, 1.0, 0)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ds)
        f.write("\n")  # blank lines are ignored
    loaded = data.load_preference_data(path)
    assert loaded.to_dict() == ds.to_dict()
    ds.save_to_disk(tmp_path / "disk")
    assert data.load_preference_data(tmp_path / "disk").to_dict() == ds.to_dict()
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "dd")
    assert len(data.load_preference_data(tmp_path / "dd")) == 12
    with pytest.raises(ValueError, match=r"holds the splits \['train'\], not 'test'"):
        data.load_preference_data(tmp_path / "dd", split="test")


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        data.load_preference_data(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"missing the field\(s\) \['rejected'\]"):
        data.load_preference_data(missing)
    with pytest.raises(ValueError, match="No such preference data file"):
        data.load_preference_data(tmp_path / "nope.jsonl")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(("rows", "match"), [
    # a string chosen, then a message list (pyarrow: "Expected bytes, got a 'list' object")
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": ANS, "rejected": "b"}],
     r"column 'chosen' holds a list in row 1 \(line 2\) but a string in row 0 \(line 1\)"),
    # the other way round (pyarrow: "cannot mix list and non-list, non-null values")
    ([{"prompt": MSG, "chosen": ANS, "rejected": ANS}, {"prompt": MSG, "chosen": "a", "rejected": ANS}],
     r"column 'chosen' holds a string in row 1 \(line 2\) but a list in row 0 \(line 1\)"),
    # an int group, then a str one (pyarrow: ArrowInvalid "Could not convert 'x' with type str")
    ([{"chosen": "a", "rejected": "b", "group": 1}, {"chosen": "a", "rejected": "b", "group": 2},
      {"chosen": "a", "rejected": "b", "group": "x"}],
     r"column 'group' holds a string in row 2 \(line 3\) but a number in row 0 \(line 1\)"),
    # a type clash inside the messages
    ([{"prompt": MSG, "chosen": ANS, "rejected": ANS},
      {"prompt": MSG, "chosen": [{"role": "assistant", "content": 7}], "rejected": ANS}],
     r"column 'chosen' holds a number at chosen\[\]\.content in row 1 \(line 2\) but a string in row 0 \(line 1\)"),
])
def test_mixed_types_name_the_file_column_and_row(tmp_path, rows, match):
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=f"^'{re.escape(str(path))}' {match}: a column must have one type in every row"):
        data.load_preference_data(path)


def test_mixed_types_in_a_json_list_name_the_row(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"chosen": "a", "rejected": "b"}, {"chosen": ANS, "rejected": "b"}]))
    with pytest.raises(ValueError, match=r"column 'chosen' holds a list in row 1 but a string in row 0: "):
        data.load_preference_data(path)


def test_tokenize_pair_matches_trl_split():
    ds = synthetic.pluralistic_task(3, 1, 0.0, 0)
    tok = synthetic.build_tokenizer(synthetic.task_texts(ds))
    ex = ds[0]
    p, c, r = data.tokenize_pair(ex, tok)
    assert p == tok(ex["prompt"])["input_ids"]
    assert c == tok(ex["chosen"])["input_ids"] + [tok.eos_token_id]
    assert r == tok(ex["rejected"])["input_ids"] + [tok.eos_token_id]
    # Implicit prompt: refused with how to split it; TRL's split takes the shared (character) prefix as the
    # prompt, and the sequences are unchanged.
    implicit = {"chosen": ex["prompt"] + ex["chosen"], "rejected": ex["prompt"] + ex["rejected"]}
    split_first = r"dataset\.map\(trl\.data_utils\.maybe_extract_prompt\)"
    with pytest.raises(ValueError, match=f"the pair has no 'prompt' .*{split_first}"):
        data.tokenize_pair(implicit, tok)
    p2, c2, r2 = data.tokenize_pair(trl.data_utils.maybe_extract_prompt(implicit), tok)
    assert p2[: len(p)] == p
    assert (p2 + c2, p2 + r2) == (p + c, p + r)


def test_drop_empty_completions_counts(caplog):
    ds = datasets.Dataset.from_dict(
        {
            "prompt_ids": [[1, 2], [1, 2, 3, 4], [1], [5]],
            "chosen_ids": [[3], [5], [], [6, 7]],
            "rejected_ids": [[4], [6], [2], [8]],
        }
    )
    with caplog.at_level("WARNING"):
        out, n = data.drop_empty_completions(ds, max_length=4, name="train")
    # row 1: the prompt fills max_length (no completion token survives); row 2: empty chosen.
    assert n == 2 and len(out) == 2
    assert out["prompt_ids"] == [[1, 2], [5]]
    assert "Dropped 2 of 4 pairs of train" in caplog.text
    out, n = data.drop_empty_completions(ds, max_length=None)
    assert n == 1
    with pytest.raises(ValueError, match="truncation_mode"):
        data.drop_empty_completions(ds, truncation_mode="middle")
