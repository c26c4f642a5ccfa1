"""Files a user saves and the messages mixlogit gives about them: permissions, non-regular targets, symlinks,
errors that name the user's path, result folders written as a unit (under SIGKILL: test_reliability_kill.py), the data fingerprint
checked by ``mixlogit report``, non-finite estimates and version fields on load, and column messages."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mixlogit as ml
from mixlogit.cli import main
from mixlogit.data import ChoiceDataError
from mixlogit.diagnostics import heterogeneity, plot_heterogeneity, write_report
from mixlogit.persistence import replace_folder, write_json
from mixlogit.wide import wide_to_long

FILES = ("results.json", "params.csv", "summary.txt")
ROLES = ["--choice", "choice", "--alt", "alt", "--situation", "situation", "--panel", "person"]
MODEL = ["--random", "x1=normal", "--fixed", "x2", "--draws", "20"]


@pytest.fixture(scope="module")
def sim():
    return ml.simulate(n_persons=60, n_situations=4, n_alts=3, random={"x1": ("normal", 1.0, 0.5)},
                       fixed={"x2": -1.0}, seed=11)


@pytest.fixture(scope="module")
def sim_csv(sim, tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "sim.csv"
    sim.df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def res(sim):
    return sim.model.fit(sim.data, draws=20, seed=0)


def fit(csv, out, *extra):
    return main(["fit", str(csv), *ROLES, *MODEL, "--out", str(out), *extra])


# ---------------------------------------------------------------------------------------------- write_json
def test_write_json_gives_the_user_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        p = write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        os.chmod(p, 0o604)  # replacing a file keeps its mode, as open() would
        write_json(p, {"x": 2}, overwrite=True)
        assert stat.S_IMODE(p.stat().st_mode) == 0o604
    finally:
        os.umask(old)
    assert json.loads(p.read_text()) == {"x": 2}
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_saved_results_get_the_same_mode_as_params_csv(res, tmp_path):
    out = tmp_path / "out"
    res.save(out / "results.json")
    res.summary_frame().to_csv(out / "params.csv")
    modes = {stat.S_IMODE((out / n).stat().st_mode) for n in ("results.json", "params.csv")}
    assert modes == {0o666 & ~_umask()}


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_write_json_refuses_non_regular_targets(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match=rf"{fifo} exists and is not a regular file \(a device, FIFO or socket\)"):
        write_json(fifo, {"x": 1}, overwrite=True)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(FileExistsError, match=r"/dev/null exists and is not a regular file"):
        write_json("/dev/null", {"x": 1}, overwrite=True)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a folder; give a file name"):
        write_json(tmp_path, {"x": 1}, overwrite=True)
    with pytest.raises(TypeError, match=r"overwrite must be True or False, got str 'no'"):
        write_json(tmp_path / "b.json", {"x": 1}, overwrite="no")


def test_write_json_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match=rf"{link} exists; pass overwrite=True"):
        write_json(link, {"x": 1})
    write_json(link, {"x": 3}, overwrite=True)
    assert link.is_symlink() and json.loads(target.read_text()) == {"x": 3}
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match=rf"{dangling} is a symlink to .*nowhere.json, which does not exist"):
        write_json(dangling, {"x": 1})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_write_errors_name_the_users_path(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as e:
            write_json(folder / "r.json", {"x": 1})
        assert str(e.value) == f"[Errno 13] cannot write {folder / 'r.json'}: Permission denied"
        assert ".tmp" not in str(e.value)
        with pytest.raises(PermissionError, match=rf"cannot write into {folder / 'out'}: Permission denied"), \
                replace_folder(folder / "out", ["a"], overwrite=False):
            pass
    finally:
        folder.chmod(0o755)


def test_a_failed_rename_names_the_users_path_not_the_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError) as e:
        write_json(tmp_path / "r.json", {"x": 1})
    assert str(e.value) == f"[Errno 13] cannot write {tmp_path / 'r.json'}: Permission denied"
    with pytest.raises(PermissionError) as e, replace_folder(tmp_path / "out", ["a"], overwrite=False) as tmp:
        (tmp / "a").write_text("1")
    assert str(e.value) == f"[Errno 13] cannot write into {tmp_path / 'out'}: Permission denied"
    assert os.listdir(tmp_path) == []  # the temporary file and folder are removed


# ---------------------------------------------------------------------------------------------- folders
def test_replace_folder_swaps_the_set_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    with replace_folder(out, ["a.txt", "b.txt"], overwrite=False) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{out} already holds a.txt, b.txt; pass overwrite=True"), \
            replace_folder(out, ["a.txt", "b.txt"], overwrite=False):
        pass
    # an error inside leaves the folder as it was
    with pytest.raises(RuntimeError, match="boom"), replace_folder(out, ["a.txt", "b.txt"], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "1"
    with replace_folder(out, ["a.txt", "b.txt"], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "notes.txt"]  # stale b.txt gone, notes kept
    assert (out / "a.txt").read_text() == "2" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden folder left
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    (out / "sub").mkdir()
    os.mkfifo(out / "pipe")
    with pytest.raises(FileExistsError, match=rf"{out} holds pipe, sub, which mixlogit did not write and does not "
                                              r"carry over \(only plain files are kept .*\): move them"):
        replace_folder(out, ["a.txt"], overwrite=True).__enter__()
    (out / "pipe").unlink()
    link = tmp_path / "link"
    link.symlink_to(out)  # a symlink to a folder: the folder it points to is replaced, the link stays
    with replace_folder(link, ["a.txt", "sub"], overwrite=True) as tmp:
        (tmp / "a.txt").write_text("3")
    assert link.is_symlink() and (out / "a.txt").read_text() == "3" and not (out / "sub").exists()


def test_the_current_folder_is_refused(sim_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match=r"\. is the current folder \(or holds it\); a results folder is replaced "
                                              r"as a unit, so give a folder below it"):
        replace_folder(".", ["a"], overwrite=False).__enter__()
    assert fit(sim_csv, tmp_path.parent) == 2
    assert f"{tmp_path.parent} is the current folder (or holds it)" in capsys.readouterr().err


def test_without_an_atomic_exchange_the_folder_is_renamed_aside(tmp_path, monkeypatch):
    from mixlogit import persistence

    monkeypatch.setattr(persistence, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for text in ("1", "2"):
        with replace_folder(out, ["a.txt"], overwrite=True) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (out / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_writes_are_cleared(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    pid = int(dead.stdout)
    (tmp_path / f".out.old-{pid}-abc").mkdir()  # the old set, renamed aside by a write killed mid-swap
    (tmp_path / f".out.old-{pid}-abc" / "a.txt").write_text("old")
    (tmp_path / f".out.tmp-{pid}-def").mkdir()  # a half-written new set
    (tmp_path / f".out.tmp-{os.getpid()}-ghi").mkdir()  # a write of a running process: left alone
    with pytest.raises(FileExistsError, match=rf"{out} already holds a.txt"):  # the old set is back
        replace_folder(out, ["a.txt"], overwrite=False).__enter__()
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{os.getpid()}-ghi", "out"]


def test_fit_overwrite_removes_the_old_report_and_keeps_user_files(sim_csv, tmp_path):
    out = tmp_path / "out"
    assert fit(sim_csv, out) == 0
    assert main(["report", str(out), "--no-data"]) == 0
    assert {"report.md", "densities.png", "forest.png"} <= {p.name for p in out.iterdir()}
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"results\.json.* exist; pass --overwrite"):
        fit(sim_csv, out)
    assert fit(sim_csv, out, "--overwrite", "--seed", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "params.csv", "results.json", "summary.txt"]
    assert (out / "mine.txt").read_text() == "keep me"
    assert ml.load(out / "results.json").settings["seed"] == 1
    # a folder holding only an old report is refused too: the report would describe another model
    only_report = tmp_path / "only"
    only_report.mkdir()
    (only_report / "report.md").write_text("old")
    with pytest.raises(SystemExit, match=rf"{only_report / 'report.md'} exist; pass --overwrite"):
        fit(sim_csv, only_report)


def test_report_is_written_as_a_unit_next_to_the_fit(res, tmp_path):
    write_json(tmp_path / "results.json", res.to_dict())
    write_report(res, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"results.json", "report.md", "densities.png", "forest.png"}
    with pytest.raises(FileExistsError, match=r"already holds report.md, densities.png, forest.png; pass "):
        write_report(res, tmp_path)
    with pytest.raises(TypeError, match=r"overwrite must be True or False, got str 'yes'"):
        write_report(res, tmp_path, overwrite="yes")
    with pytest.raises(TypeError, match=r"overwrite must be True or False, got int 1"):
        plot_heterogeneity(res, tmp_path, overwrite=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "individual.png").write_bytes(b"from an older model")
    paths = plot_heterogeneity(res, tmp_path, overwrite=True)
    assert set(paths) == {"densities", "forest"} and paths["forest"] == tmp_path / "forest.png"
    assert not (tmp_path / "individual.png").exists()  # the stale plot went with the old set
    assert (tmp_path / "results.json").read_bytes() == before["results.json"]


# ---------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_ignores_row_order_and_sees_changed_values(sim):
    d = sim.data
    fp = d.fingerprint(["x1", "x2"])
    shuffled = sim.df.sample(frac=1.0, random_state=3)
    d2 = ml.ChoiceData.from_long(shuffled, choice="choice", alt="alt", situation="situation", panel="person")
    assert d2.fingerprint(["x2", "x1", "asc.1"]) == fp and len(fp) == 64
    changed = sim.df.copy()
    changed.loc[5, "x2"] += 1e-9
    d3 = ml.ChoiceData.from_long(changed, choice="choice", alt="alt", situation="situation", panel="person")
    assert d3.fingerprint(["x1", "x2"]) != fp
    assert d.fingerprint(["x1"]) != fp  # the columns are part of it


def test_report_refuses_other_data(sim, sim_csv, tmp_path, capsys):
    out = tmp_path / "out"
    csv = tmp_path / "data.csv"
    sim.df.to_csv(csv, index=False)
    assert fit(csv, out) == 0
    src = ml.load(out / "results.json").settings["data"]
    assert src["rows"] == len(sim.df) and src["sep"] == ","
    assert src["fingerprint"] == sim.data.fingerprint(["x1", "x2"])
    changed = sim.df.copy()
    changed["x1"] = changed["x1"] * 2
    changed.to_csv(csv, index=False)
    with pytest.raises(SystemExit, match=rf"{csv} differs from the data the model in {out / 'results.json'} was "
                                         r"fitted on: the values of the columns x1, x2 or of the choice"):
        main(["report", str(out)])
    sim.df.iloc[:-3].to_csv(csv, index=False)
    with pytest.raises(SystemExit, match=rf"{csv} has {len(sim.df) - 3} rows, but the model in .* was fitted on "
                                         rf"{len(sim.df)}"):
        main(["report", str(out)])
    sim.df.sample(frac=1.0, random_state=1).to_csv(csv, index=False)  # same data, other row order: accepted
    assert main(["report", str(out)]) == 0
    # an older results file without a fingerprint still reports, with a note
    d = json.loads((out / "results.json").read_text())
    del d["settings"]["data"]["fingerprint"]
    write_json(out / "results.json", d, overwrite=True, indent=1)
    capsys.readouterr()
    assert main(["report", str(out), "--overwrite"]) == 0
    assert "holds no fingerprint of its data (written by an older mixlogit)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- separators
def test_csv_with_another_separator_gets_a_hint_and_sep_reads_it(sim, tmp_path):
    csv = tmp_path / "semi.csv"
    sim.df.to_csv(csv, index=False, sep=";")
    with pytest.raises(SystemExit, match=r"read with separator ',' it has a single column, "
                                         r"'person;situation;alt;choice;x1;x2'; it "
                                         r"probably uses ';' \(pass --sep ';'\)"):
        fit(csv, tmp_path / "o")
    assert fit(csv, tmp_path / "o", "--sep", ";") == 0
    assert ml.load(tmp_path / "o" / "results.json").settings["data"]["sep"] == ";"
    assert main(["report", str(tmp_path / "o")]) == 0  # the report rereads with the same separator
    tsv = tmp_path / "tab.tsv"
    sim.df.to_csv(tsv, index=False, sep="\t")
    with pytest.raises(SystemExit, match=r"it probably uses '\\t' \(pass --sep '\\t'\)"):
        fit(tsv, tmp_path / "t")
    assert fit(tsv, tmp_path / "t", "--sep", "\\t") == 0
    with pytest.raises(SystemExit, match=r"--sep applies to a CSV FILE, not to --dataset"):
        main(["fit", "--dataset", "electricity", "--sep", ";", "--out", str(tmp_path / "e")])


# ---------------------------------------------------------------------------------------------- loading
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(("fixture", "field", "value", "what"), [
    ("msl_results_v1.json", "loglik", float("nan"), r"NaN \(or null\) \(1 such entries\)"),
    ("msl_results_v1.json", "theta", [0.1, float("inf")], r"an infinite value at position \(1,\)"),
    ("msl_results_v1.json", "hessian", "nan_in_0_0", r"NaN \(or null\) at position \(0, 0\)"),
    ("svi_results_v1.json", "draws", "nan_in_0_0", r"NaN \(or null\) at position \(0, 0, 0\)"),
    ("svi_results_v1.json", "individual_mean", "nan_in_0_0", r"NaN \(or null\) at position \(0, 0\)"),
])
def test_a_file_with_non_finite_estimates_is_refused_naming_the_field(fixture, field, value, what, tmp_path):
    d = json.loads((FIXTURES / fixture).read_text())
    if value == "nan_in_0_0":
        value = inner = d[field]
        while isinstance(inner[0][0], list):
            inner = inner[0]
        inner[0][0] = float("nan")
    d[field] = value
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))  # Python's json writes NaN and Infinity as bare tokens
    assert "NaN" in p.read_text() or "Infinity" in p.read_text()
    with pytest.raises(ValueError, match=rf"{p} is damaged: the field '{field}' holds {what}"):
        ml.load(p)


def test_results_with_non_finite_estimates_are_not_saved(res, tmp_path):
    bad = copy.copy(res)
    bad.loglik = float("nan")
    with pytest.raises(ValueError, match=rf"cannot save {tmp_path / 'r.json'}: the field 'loglik' holds NaN"):
        bad.save(tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("version", "message"), [
    (99, r"has format version 99; this mixlogit reads version 1: the file was written by a newer mixlogit; upgrade"),
    (0, (r"has format version 0, older than any mixlogit wrote \(this mixlogit reads version 1, and no earlier "
         r"version exists\); the file is damaged")),
    (-3, r"has format version -3, older than any mixlogit wrote"),
    ("1", (r"has a malformed version field '1' \(a str, not an integer\); this mixlogit reads version 1 \(the "
           r"file is damaged")),
    (True, r"has a malformed version field True \(a bool, not an integer\)"),
    (1.0, r"has a malformed version field 1.0 \(a float, not an integer\)"),
    ("missing", r"has no version field; this mixlogit reads version 1 \(the file is damaged"),
])
def test_version_advice(version, message, tmp_path):
    d = json.loads((FIXTURES / "msl_results_v1.json").read_text())
    if version == "missing":
        del d["version"]
    else:
        d["version"] = version
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as e:
        ml.load(p)
    assert ("upgrade" in str(e.value)) == (version == 99)


# ---------------------------------------------------------------------------------------------- messages
def test_duplicate_rows_name_the_labels_even_with_a_repeated_index(sim):
    df = pd.concat([sim.df.iloc[:3], sim.df.iloc[:3]])  # index 0, 1, 2, 0, 1, 2
    with pytest.raises(ChoiceDataError) as e:
        ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation")
    assert str(e.value) == ("alternative 0 appears twice in situation 0 (row 0); column 'alt' must be unique "
                            "within column 'situation'")
    df = pd.concat([sim.df.iloc[:3], sim.df.iloc[3:6]])  # index 0..5 but repeat labels below
    df.index = [0, 1, 2, 0, 1, 2]
    bad = df.assign(choice=["x", 0, 0, 1, 0, 0])
    with pytest.raises(ChoiceDataError) as e:
        ml.ChoiceData.from_long(bad, choice="choice", alt="alt", situation="situation")
    assert str(e.value) == "choice column 'choice' must hold 0/1 or True/False; row 0 holds 'x'"
    data = ml.ChoiceData.from_long(df.assign(x1=["a", 1, 2, 3, 4, 5]), choice="choice", alt="alt",
                                   situation="situation")
    with pytest.raises(ChoiceDataError) as e:
        ml.MixedLogit(fixed=["x1"]).fit(data)
    assert "row 0 holds 'a'" in str(e.value)
    wide = pd.DataFrame({"t_a": [1.0, 2.0], "t_b": [3.0, 4.0], "pick": ["a", "c"]}, index=[7, 7])
    with pytest.raises(ChoiceDataError) as e:
        wide_to_long(wide, ["a", "b"], {"t": "t_{alt}"}, choice="pick")
    assert str(e.value) == ("choice column 'pick' holds 'c' in row 7, which is not one of the alternatives "
                            "['a', 'b']")


def test_duplicate_column_names_are_refused(sim):
    df = sim.df.copy()
    df.columns = ["person", "situation", "alt", "choice", "x1", "x1"]
    with pytest.raises(ChoiceDataError, match=r"column 'x1' appears 2 times in the table; column names must be "
                                              r"unique \(rename or drop the copies\)"):
        ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="situation")
    wide = pd.DataFrame([[1, 2, 3, "a"]], columns=["t_a", "t_b", "t_b", "pick"])
    with pytest.raises(ChoiceDataError, match=r"column 't_b' appears 2 times in the table"):
        wide_to_long(wide, ["a", "b"], {"t": "t_{alt}"}, choice="pick")


def test_wide_to_long_names_every_missing_column():
    wide = pd.DataFrame({"id": [1, 2], "t_a": [1.0, 2.0], "t_b": [3.0, 4.0], "pick": ["a", "b"], "av_a": [1, 1]})
    cases = [
        ({"situation": "sid"}, r"column 'sid' \(given as situation=\) is not in the table; columns are: id, t_a"),
        ({"choice": "chosen"}, r"column 'chosen' \(given as choice=\) is not in the table"),
        ({"keep": ["who"]}, r"column 'who' \(given as keep\[0\]=\) is not in the table"),
        ({"varying": {"t": "time_{alt}"}}, (r"column 'time_a' \(attribute 't', alternative 'a'\) is not in the "
                                            r"table; columns are: id, t_a, t_b, pick, av_a")),
        ({"avail": {"a": "av_a", "b": "av_b"}}, r"column 'av_b' \(avail, alternative 'b'\) is not in the table"),
        ({"avail": {"a": "av_a"}}, r"avail has no existing column for alternative 'b' \(it names none\)"),
    ]
    for change, message in cases:
        kw = {"varying": {"t": "t_{alt}"}, "choice": "pick", "situation": "id"} | change
        with pytest.raises(ChoiceDataError, match=message):
            wide_to_long(wide, ["a", "b"], **kw)
    assert len(wide_to_long(wide, ["a", "b"], {"t": "t_{alt}"}, choice="pick", situation="id")) == 4


def test_alpha_and_level_as_text_are_refused_naming_the_argument(res):
    with pytest.raises(TypeError, match=r"alpha must be a number in \(0, 1\), got str '0.05'"):
        res.conf_int("0.05")
    with pytest.raises(TypeError, match=r"alpha must be a number in \(0, 1\), got bool True"):
        res.conf_int(True)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got nan"):
        res.conf_int(float("nan"))
    with pytest.raises(TypeError, match=r"level must be a number in \(0, 1\), got str '0.9'"):
        res.heterogeneity(level="0.9")
    with pytest.raises(TypeError, match=r"level must be a number in \(0, 1\), got str '0.9'"):
        heterogeneity(res, level="0.9")
    assert res.conf_int(np.float64(0.1)).shape == (3, 2)
