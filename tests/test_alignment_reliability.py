"""Alignment under bad input: boolean arguments, honest integration-error estimates, and errors that name the file,
line, row, field or parameter at fault (damaged files, incomplete model folders, bad roles, NaN parameters)."""

import json
import math
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets
import torch

from alignment import synthetic
from alignment.data import drop_empty_completions, load_preference_data, validate_preference_dataset
from alignment.losses import mixdpo_loss
from alignment.models import load_causal_lm
from alignment.run_dir import (
    STRENGTH_CONFIG_NAME,
    load_strength,
    read_run_record,
    read_strength_config,
    run_files_present,
    save_strength,
    strength_from_settings,
    strength_settings,
    write_run_records,
)
from alignment.strength import (
    GammaStrength,
    LogNormalStrength,
    PointStrength,
    build_strength,
    default_strength_init,
)

F64 = torch.float64
NAN = float("nan")


# ---------------------------------------------------------------------------------------------- B: booleans
@pytest.mark.parametrize("call,name", [
    (lambda: PointStrength(learnable="no"), "learnable"),
    (lambda: LogNormalStrength(mean=0.1, fix_mean="no"), "fix_mean"),
    (lambda: GammaStrength(mean=0.1, fix_mean="no"), "fix_mean"),
    (lambda: build_strength("point", {"beta": 0.1}, fix_mean="no"), "fix_mean"),
    (lambda: default_strength_init("lognormal", 0.1, None, "no"), "fix_mean"),
    (lambda: strength_settings("gamma", 0.1, fix_mean="no"), "fix_mean"),
    (lambda: validate_preference_dataset([{"prompt": "p", "chosen": "a", "rejected": "b"}], require_prompt="no"),
     "require_prompt"),
    (lambda: drop_empty_completions(datasets.Dataset.from_list(
        [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}]), log="no"), "log"),
    (lambda: read_run_record(".", required="no"), "required"),
    (lambda: run_files_present(".", keep_checkpoints="no"), "keep_checkpoints"),
    (lambda: write_run_records(".", {}, {}, overwrite="no"), "overwrite"),
])
def test_boolean_arguments_accept_only_booleans(call, name):
    with pytest.raises(TypeError, match=f"^{name} must be True or False, got str 'no'"):
        call()


def test_config_boolean_field_accepts_only_booleans(tmp_path):
    from alignment.config import MixDPOConfig

    with pytest.raises(TypeError, match="^strength_fix_mean must be True or False, got str 'no'"):
        MixDPOConfig(output_dir=str(tmp_path), strength_fix_mean="no", report_to="none", use_cpu=True)


# ---------------------------------------------------------------------------------------------- B: error estimate
@pytest.mark.parametrize("kind", ["gauss-hermite", "quadrature"])
@pytest.mark.parametrize("nodes", [1, 2, 3, 5, 10, 16, 20, 24, 100])
def test_error_estimate_is_never_a_false_zero_and_the_nodes_are_the_ones_used(kind, nodes):
    s = LogNormalStrength(mu=0.0, sigma=2.0, integrator=kind, nodes=nodes)
    used = s._z.numel()  # the rule's own node count
    assert s.nodes_used == used
    assert re.search(rf"nodes={used}\b", repr(s))
    assert ("requested" in repr(s)) == (used != nodes)
    h = torch.tensor([-3.0, -0.5, 0.7, 4.0], dtype=F64)
    pair = s.error_estimate_nodes
    if pair is None:
        with pytest.raises(ValueError, match=rf"{used} nodes.*false 0\); pass nodes >= \d+"):
            s.error_estimate(h)
        return
    fine, coarse = pair
    assert fine == used and coarse < fine and s._z_coarse.numel() == coarse
    exact = LogNormalStrength(mu=0.0, sigma=2.0, integrator="quadrature", nodes=1024).log_prob_preferred(h)
    actual = (s.log_prob_preferred(h) - exact).abs().detach()
    estimate = s.error_estimate(h)
    assert bool((estimate > 0).all())  # these rules are not exact at any of these margins
    if used >= 16:  # a rule of a few nodes is too rough for its difference to bound its error
        assert float(actual.max()) <= float(estimate.max())


def test_error_estimate_without_a_coarser_companion_is_refused_with_the_reason(monkeypatch):
    # A rule whose companion is the rule itself (the fault of a companion equal to the fine rule) is refused.
    from alignment import strength_base
    from mixlogit.draws import deterministic_rule as real

    def same_companion(kind, n, dim, *a, **k):
        rule = real(kind, n, dim, *a, **k)
        return type(rule)(z=rule.z, log_weights=rule.log_weights, kind=rule.kind, coarse=rule)

    monkeypatch.setattr(strength_base, "deterministic_rule", same_companion)
    s = LogNormalStrength(integrator="gauss-hermite", nodes=8)
    assert s.error_estimate_nodes is None
    with pytest.raises(ValueError, match="'gauss-hermite' rule with 8 nodes: .*false 0"):
        s.error_estimate(torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------------------------- C: NaN parameters
@pytest.mark.parametrize("call,name", [
    (lambda: LogNormalStrength(mu=NAN), "mu"), (lambda: LogNormalStrength(sigma=NAN), "sigma"),
    (lambda: LogNormalStrength(mean=NAN), "mean"), (lambda: GammaStrength(shape=NAN), "shape"),
    (lambda: GammaStrength(rate=NAN), "rate"), (lambda: PointStrength(beta=NAN), "beta"),
])
def test_nan_parameters_are_refused_by_the_constructors(call, name):
    with pytest.raises(ValueError, match=f"^{name} must be a .*finite.*got nan"):
        call()


def test_nan_parameter_during_training_is_named():
    s = LogNormalStrength(mu=-2.0, sigma=0.5)
    with torch.no_grad():
        s.log_sigma.fill_(NAN)  # what a diverged optimizer step leaves
    lp = torch.tensor([-1.0, -2.0], dtype=F64)
    with pytest.raises(ValueError, match="lognormal strength has non-finite parameters: log_sigma = nan, sigma = nan"):
        mixdpo_loss(lp, lp - 1, lp, lp, s)


def test_nan_parameter_in_a_loaded_strength_is_named(tmp_path):
    meta = strength_settings("gamma", 0.1)
    s = strength_from_settings(meta)
    with torch.no_grad():
        s.log_rate.fill_(NAN)
    save_strength(s, str(tmp_path), meta)
    # strength.json records the NaN parameter: refused naming the file and the field
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / STRENGTH_CONFIG_NAME))} is damaged: field "
                                         r"'params.rate' must be a finite number, got nan"):
        load_strength(str(tmp_path))
    # with a clean strength.json, the NaN in strength.pt is named by parameter
    info = json.loads((tmp_path / STRENGTH_CONFIG_NAME).read_text())
    info.update(params={"shape": 4.0, "rate": 40.0}, mean=0.1, std=0.05, cv=0.5)
    (tmp_path / STRENGTH_CONFIG_NAME).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"gamma strength loaded from .*strength\.pt has non-finite parameters: "
                                         r"log_rate = nan, rate = nan"):
        load_strength(str(tmp_path))


# ---------------------------------------------------------------------------------------------- C: strength.json
@pytest.mark.parametrize("text,message", [
    ("{not json", "it is not JSON text"),
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('{"init": {}, "beta": 0.1}', "the field 'family' is missing"),
    ('{"family": "lognormal", "beta": 0.1}', "the field 'init' is missing"),
    ('{"family": 3, "init": {}, "beta": 0.1}', "field 'family' must be one of 'point', 'lognormal', 'gamma'"),
    ('{"family": "lognormal", "init": [], "beta": 0.1}', "field 'init' must be an object"),
    ('{"family": "lognormal", "init": {}, "beta": "0.1"}', "field 'beta' must be a positive finite number"),
    ('{"family": "lognormal", "init": {"sigma": NaN}, "beta": 0.1}', "field 'init.sigma' must be a finite number, got nan"),
    ('{"family": "lognormal", "init": {}, "beta": 0.1, "nodes": "16"}', "field 'nodes' must be a positive integer"),
    ('{"family": "lognormal", "init": {}, "beta": 0.1, "fix_mean": "no"}', "field 'fix_mean' must be true or false"),
    ('{"family": "lognormal", "init": {}, "beta": 0.1, "params": {"mu": NaN}}', "field 'params.mu' must be a finite"),
    ('{"family": "lognormal", "init": {"mu": -2, "sigma": 0.5}, "beta": 0.1, "integrator": "nope"}',
     "its settings do not make a strength: integrator 'nope'"),
])
def test_damaged_strength_json_names_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / STRENGTH_CONFIG_NAME
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path} is damaged: {message}")):
        load_strength(str(tmp_path))
    if "settings" not in message:
        with pytest.raises(ValueError, match=re.escape(f"{path} is damaged")):
            read_strength_config(str(tmp_path))


def test_saved_strength_loads_back(tmp_path):
    meta = strength_settings("lognormal", 0.1, {"sigma": 0.7})
    save_strength(strength_from_settings(meta), str(tmp_path), meta)
    strength, info = load_strength(str(tmp_path))
    assert math.isclose(info["params"]["sigma"], 0.7) and abs(float(strength.sigma.detach()) - 0.7) < 1e-12


# ---------------------------------------------------------------------------------------------- C: data files
def test_jsonl_that_is_not_utf8_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                     b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} line 2 is not UTF-8 text (byte b'\\xe9'")):
        load_preference_data(path)
    whole = tmp_path / "pairs.json"
    whole.write_bytes(b'[\n{"prompt": "p", "chosen": "a", "rejected": "b"},\n\n{"prompt": "\xff"}]')
    with pytest.raises(ValueError, match=re.escape(f"{str(whole)!r} line 4 is not UTF-8 text")):
        load_preference_data(whole)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert len(load_preference_data(bom)) == 1


def _msg(role, content="x"):
    return {"role": role, "content": content}


@pytest.mark.parametrize("row,message", [
    ({"prompt": [_msg("bot")], "chosen": [_msg("assistant")], "rejected": [_msg("assistant")]},
     "pairs row 1: field 'prompt' message 0 has role 'bot'; accepted roles: 'system', 'user', 'assistant'."),
    ({"prompt": [_msg("user")], "chosen": [_msg("user")], "rejected": [_msg("assistant")]},
     "pairs row 1: field 'chosen' message 0 has role 'user', but the completion must be from the 'assistant'."),
    ({"prompt": [_msg("user")], "chosen": [_msg("assistant")], "rejected": [_msg("assistant"), _msg("tool")]},
     "pairs row 1: field 'rejected' message 1 has role 'tool'; accepted roles"),
    ({"chosen": [_msg("user"), _msg("assistant")], "rejected": [_msg("assistant"), _msg("user")]},
     "pairs row 1: field 'rejected' message 1 has role 'user', but the completion must be from the 'assistant'."),
])
def test_conversational_roles_are_checked(row, message):
    good = {"prompt": [_msg("system"), _msg("user")], "chosen": [_msg("assistant")],
            "rejected": [_msg("assistant")]}
    if "prompt" not in row:
        good = {"chosen": [_msg("user"), _msg("assistant")], "rejected": [_msg("user"), _msg("assistant", "y")]}
    assert validate_preference_dataset([good], name="pairs").endswith("conversational")
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_preference_dataset([good, row], name="pairs")


def test_all_empty_completions_are_refused_naming_the_dataset(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "", "rejected": " "} for i in range(3)]
    with pytest.raises(ValueError, match="^train_dataset: the chosen and rejected completions of all 3 rows checked "
                                         "are empty"):
        validate_preference_dataset(rows, name="train_dataset")
    conv = [{"prompt": [_msg("user")], "chosen": [_msg("assistant", "")], "rejected": [_msg("assistant", "")]}]
    with pytest.raises(ValueError, match="^eval: the chosen and rejected completions of all 1 rows"):
        validate_preference_dataset(conv, name="eval")
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"{path}: the chosen and rejected completions")):
        load_preference_data(path)
    validate_preference_dataset(rows + [{"prompt": "p", "chosen": "a", "rejected": ""}])  # one pair has a signal
    # after tokenization: a dataset all of whose pairs lose their completions is an error, not silently emptied
    tokenized = datasets.Dataset.from_list([{"prompt_ids": [1] * 8, "chosen_ids": [2], "rejected_ids": [3]}] * 2)
    with pytest.raises(ValueError, match="^eval_dataset: every one of its 2 pairs has an empty chosen or rejected "
                                         "completion after truncation to max_length=4"):
        drop_empty_completions(tokenized, max_length=4, name="eval_dataset")
    kept, dropped = drop_empty_completions(tokenized, max_length=16)
    assert len(kept) == 2 and dropped == 0


# ---------------------------------------------------------------------------------------------- C: model folders
@pytest.fixture(scope="module")
def tiny():
    tok = synthetic.build_tokenizer()
    return synthetic.tiny_gpt_neox(tok, hidden_size=16, num_layers=1, seed=0), tok


def test_model_folder_without_tokenizer_files_is_refused(tiny, tmp_path):
    model, tok = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match=re.escape(f"the model folder {str(folder)!r} is not complete: it has no "
                                                   "the tokenizer files (tokenizer.json or")):
        load_causal_lm(str(folder))
    tok.save_pretrained(folder)
    _, loaded_tok = load_causal_lm(str(folder))
    assert loaded_tok("a b")["input_ids"]


def test_empty_model_folder_names_what_is_missing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as err:
        load_causal_lm(str(empty))
    message = str(err.value)
    assert "sentencepiece" not in message.lower()
    for part in ("config.json", "the weights (model.safetensors", "the tokenizer files (tokenizer.json"):
        assert part in message
    from alignment.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(10)))
    assert main(["train", "--model", str(empty), "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    err_text = capsys.readouterr().err
    assert "config.json" in err_text and "tokenizer files" in err_text and "sentencepiece" not in err_text.lower()


def test_the_mean_is_pinned_by_default_and_a_location_init_says_how_to_free_it(tmp_path):
    from alignment.config import MixDPOConfig
    from alignment.strength import default_strength_init

    cfg = MixDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert cfg.strength_fix_mean is True
    assert default_strength_init("lognormal", 0.3, {"sigma": 0.7}, True) == {"sigma": 0.7}  # the mean comes from beta
    assert default_strength_init("lognormal", 0.3, {"sigma": 0.7}, False) == pytest.approx(
        {"mu": math.log(0.3) - 0.7**2 / 2, "sigma": 0.7})
    with pytest.raises(ValueError, match=r"strength_init sets \['mu'\], which a pinned mean .* strength_fix_mean=False"):
        default_strength_init("lognormal", 0.1, {"mu": 0.0}, True)
    assert default_strength_init("lognormal", 0.1, {"mu": 0.0}, False)["mu"] == 0.0
    assert default_strength_init("point", 0.1, None, True) == {"beta": 0.1}  # nothing to pin: no error


def test_the_strength_is_refitted_by_default_where_there_is_something_to_fit(tmp_path):
    """The default update is the benchmark's (refit on cached margins); a frozen point and Monte Carlo rules, whose
    objective is not a fixed function, keep the gradient. An explicit setting is kept."""
    from alignment.cli import build_parser
    from alignment.config import MixDPOConfig

    def update(**kw):
        return MixDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw).strength_update

    assert update() == "refit"  # LogNormal, pinned mean: the default configuration
    assert update(strength="gamma") == "refit"
    assert update(strength="point") == "gradient"  # nothing to fit
    assert update(strength="point", strength_learnable=True) == "refit"  # learned-beta DPO, as benchmarked
    assert update(strength="lognormal", strength_integrator="mc") == "gradient"
    assert update(strength_update="gradient") == "gradient"
    assert update(strength_level="annotator") == "refit"
    with pytest.raises(ValueError, match="strength_update"):
        update(strength_update="adam")
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o"])
    assert args.strength_update is None  # the CLI leaves it to MixDPOConfig
