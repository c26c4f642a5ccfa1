"""``mixlogit`` command line: fit a model on a CSV file or a built-in data set, write the results.

Under ``torchrun`` (``torchrun --nproc_per_node 2 -m mixlogit fit ...``) an MSL fit splits its persons over the
ranks (:mod:`mixlogit.distributed`): every rank fits, rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch

from .data import ChoiceData
from .datasets import DATASET_COLUMNS, DATASET_MODELS, DATASETS
from .devices import resolve_device
from .diagnostics import PLOT_FILES, write_report
from .diagnostics.report import REPORT_FILES
from .distributed import launched_by_torchrun, torchrun_group, world
from .draws import DRAW_TYPES
from .loading import load
from .model import MixedLogit
from .persistence import check_folder, existing, replace_folder
from .precision import PRECISIONS

#: The files ``mixlogit fit`` writes into its ``--out`` folder.
RESULT_FILES = ("results.json", "params.csv", "summary.txt")
#: What a new fit replaces in ``--out`` (with ``--overwrite``): its own files and a previous model's report and
#: plots. Other files there are kept; the folder is written as a unit (:func:`mixlogit.persistence.replace_folder`).
FIT_REPLACES = (*RESULT_FILES, *REPORT_FILES, *PLOT_FILES)
#: Separators a CSV read as one column probably uses (for the hint).
SEPARATORS = {";": "';'", "\t": "'\\t'", "|": "'|'", ",": "','"}


def _parse_random(text: str | None) -> dict[str, str]:
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise SystemExit(f"--random expects name=distribution pairs separated by commas, got {item!r}")
        name, dist = (part.strip() for part in item.split("=", 1))
        if name in out:
            raise SystemExit(f"--random names {name!r} twice ({out[name]} and {dist}); give each coefficient once")
        out[name] = dist
    return out


def _parse_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixlogit", description="Mixed logit estimation (MSL, SVI, NUTS).")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a model and write results.json, params.csv and summary.txt")
    f.add_argument("file", nargs="?", help="long-format CSV (one row per alternative per choice situation)")
    f.add_argument("--dataset", choices=sorted(DATASETS), help="a built-in data set instead of FILE "
                   "(electricity: spec E1, six normal coefficients, panel by id; train: the Netherlands train "
                   "binary panel, S-MNL on price, time, change, comfort; unless --random/--fixed given)")
    f.add_argument("--sep", default=",", help="column separator of FILE (default: %(default)r; '\\t' for tabs)")
    f.add_argument("--choice", help="column with 1/True for the chosen alternative")
    f.add_argument("--alt", help="alternative label column")
    f.add_argument("--situation", help="choice-situation id column")
    f.add_argument("--panel", help="person id column (panel data)")
    f.add_argument("--avail", help="0/1 availability column")
    f.add_argument("--weights", help="weight column")
    f.add_argument("--random", help="random coefficients, e.g. pf=normal,cl=lognormal")
    f.add_argument("--fixed", help="fixed coefficients, e.g. loc,wk")
    f.add_argument("--asc", action="store_true", help="alternative-specific constants")
    f.add_argument("--base-alt", help="reference alternative for the constants")
    f.add_argument("--scale", choices=["lognormal"], help="a random scale of the whole utility per person "
                   "(panel) or situation: S-MNL with --fixed, G-MNL-style scaling of --random coefficients")
    f.add_argument("--correlated", nargs="?", const="all", help="correlate normal random coefficients "
                   "(all, or a comma-separated list)")
    f.add_argument("--method", default="msl", choices=["msl", "svi", "nuts"])
    f.add_argument("--draws", type=int, default=1000)
    f.add_argument("--draw-type", default="halton", choices=DRAW_TYPES)
    f.add_argument("--antithetic", action="store_true")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--precision", default="double", choices=list(PRECISIONS), help="MSL: float64 throughout, or "
                   "mixed (float32 for the largest pass, float64 sums and standard errors) (default: %(default)s)")
    f.add_argument("--device", help="MSL: where the tensors live, e.g. cuda (default: cpu); under torchrun each "
                   "rank takes the GPU of its LOCAL_RANK")
    f.add_argument("--out", default="mixlogit-results", help="output folder (default: %(default)s)")
    f.add_argument("--overwrite", action="store_true", help="replace existing result files in --out (and a previous "
                   "model's report and plots there; other files are kept)")
    b = f.add_argument_group("Bayesian estimation (--method svi | nuts)")
    b.add_argument("--steps", type=int, default=3000, help="SVI: most optimization steps (default: %(default)s)")
    b.add_argument("--guide", choices=["marginal", "fullrank", "meanfield", "amortized"],
                   help="SVI guide (default: marginal, or fullrank with --subsample)")
    b.add_argument("--subsample", type=int, help="SVI: persons per step (minibatch SVI)")
    b.add_argument("--learning-rate", type=float, default=0.01, help="SVI: Adam learning rate (default: %(default)s)")
    b.add_argument("--num-samples", type=int, default=1000, help="NUTS: draws per chain (default: %(default)s)")
    b.add_argument("--num-warmup", type=int, default=1000, help="NUTS: warmup steps per chain (default: %(default)s)")
    b.add_argument("--chains", type=int, default=2, help="NUTS: chains (default: %(default)s)")
    b.add_argument("--prior", action="append", default=[], metavar="KEY=PRIOR",
                   help="override a prior, e.g. --prior sd=halfnormal(2) --prior pf='normal(0, 5)'; keys: fixed, "
                   "loc, sd, corr or a parameter name (repeatable)")
    r = sub.add_parser("report", help="write plots and a report (summary and heterogeneity tables) for a folder "
                       "written by `mixlogit fit`")
    r.add_argument("results_dir", help="folder with results.json")
    r.add_argument("--format", default="md", choices=["md", "html"], help="report format (default: %(default)s)")
    r.add_argument("--out", help="output folder (default: RESULTS_DIR)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report and its plots")
    r.add_argument("--no-data", action="store_true", help="do not reload the estimation data (skips az.loo and "
                   "MSL individual-level plots)")
    return p


def _parse_priors(items: list[str]) -> dict[str, str] | None:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--prior expects KEY=PRIOR, e.g. sd='halfnormal(2)', got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out or None


def _data_source(args) -> dict:
    """How to read the estimation data again (stored with the results, used by `mixlogit report`)."""
    src = {k: getattr(args, k) for k in ("choice", "alt", "situation", "panel", "avail", "weights")}
    if args.dataset:
        src["dataset"] = args.dataset
    else:
        src["file"] = str(Path(args.file).resolve())
        src["sep"] = args.sep
    return src


def _fingerprint(res, data: ChoiceData) -> str:
    """The fingerprint of the columns the model uses (and the role columns) in ``data``."""
    return data.fingerprint([*res.spec.random_names, *res.spec.fixed])


def _check_same_data(res, data: ChoiceData, path: Path) -> None:
    """Refuse data that differ from those the results in ``path`` were fitted on."""
    src = res.settings.get("data") or {}
    where = src.get("file") or f"the data set {src.get('dataset')!r}"
    if "fingerprint" not in src:
        print(f"mixlogit: note: {path} holds no fingerprint of its data (written by an older mixlogit); "
              f"{where} is not checked against the fit", file=sys.stderr)
        return
    if src.get("rows") is not None and src["rows"] != data.n_rows:
        raise SystemExit(f"{where} has {data.n_rows} rows, but the model in {path} was fitted on {src['rows']}; "
                         "give the estimation data or refit (--no-data skips the data)")
    if _fingerprint(res, data) != src["fingerprint"]:
        cols = [c for c in (*res.spec.random_names, *res.spec.fixed) if c in data.df.columns]
        raise SystemExit(f"{where} differs from the data the model in {path} was fitted on: the values of the "
                         f"columns {', '.join(cols)} or of the choice, alternative, situation, panel, availability or "
                         "weight columns changed; give the estimation data or refit (--no-data skips the data)")


def _reload_data(settings: dict) -> ChoiceData | None:
    src = settings.get("data")
    if not src:
        return None
    if "dataset" in src:
        df = DATASETS[src["dataset"]]()
        cols = dict(DATASET_COLUMNS[src["dataset"]])
    else:
        path = Path(src["file"])
        if not path.exists():
            print(f"mixlogit: note: estimation data {path} not found; the report skips what needs the data",
                  file=sys.stderr)
            return None
        df = _read_csv(path, src.get("sep", ","))
        cols = {}
    for k in ("choice", "alt", "situation", "panel"):
        if src.get(k):
            cols[k] = src[k]
    return ChoiceData.from_long(df, avail=src.get("avail"), weights=src.get("weights"), **cols)


def _load_data(args) -> tuple[ChoiceData, dict, list]:
    if args.dataset and args.file:
        raise SystemExit("give either FILE or --dataset, not both")
    if args.dataset:
        if args.sep != ",":
            raise SystemExit("--sep applies to a CSV FILE, not to --dataset")
        df = DATASETS[args.dataset]()
        cols = dict(DATASET_COLUMNS[args.dataset])
        for k in ("choice", "alt", "situation", "panel"):
            if getattr(args, k):
                cols[k] = getattr(args, k)
        default = DATASET_MODELS[args.dataset]
        given = bool(args.random or args.fixed)
        random = _parse_random(args.random) if given else dict(default["random"])
        fixed = _parse_list(args.fixed) if given else list(default["fixed"])
        if not given and args.scale is None:
            args.scale = default.get("scale")
    elif args.file:
        path = Path(args.file)
        if not path.exists():
            raise SystemExit(f"{path}: no such file")
        missing = [f"--{k}" for k in ("choice", "alt", "situation") if not getattr(args, k)]
        if missing:
            raise SystemExit(f"fitting a file needs {', '.join(missing)}")
        df = _read_csv(path, args.sep)
        cols = {"choice": args.choice, "alt": args.alt, "situation": args.situation, "panel": args.panel}
        random, fixed = _parse_random(args.random), _parse_list(args.fixed)
    else:
        raise SystemExit("give a CSV FILE or --dataset NAME")
    data = ChoiceData.from_long(df, avail=args.avail, weights=args.weights, **cols)
    return data, random, fixed


#: Options that apply to some methods only: (destination, flag, methods).
METHOD_OPTIONS = [("draws", "--draws", ("msl",)), ("draw_type", "--draw-type", ("msl",)),
                  ("antithetic", "--antithetic", ("msl",)), ("precision", "--precision", ("msl",)),
                  ("device", "--device", ("msl",)), ("steps", "--steps", ("svi",)),
                  ("guide", "--guide", ("svi",)), ("subsample", "--subsample", ("svi",)),
                  ("learning_rate", "--learning-rate", ("svi",)), ("num_samples", "--num-samples", ("nuts",)),
                  ("num_warmup", "--num-warmup", ("nuts",)), ("chains", "--chains", ("nuts",)),
                  ("prior", "--prior", ("svi", "nuts"))]


def _check_fit_args(args) -> None:
    """Refuse, before any work, what would be ignored or fail only after the fit."""
    defaults = build_parser().parse_args(["fit"])
    for dest, flag, methods in METHOD_OPTIONS:
        if args.method not in methods and getattr(args, dest) != getattr(defaults, dest):
            raise SystemExit(f"{flag} applies to --method {' or '.join(methods)}, not --method {args.method}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    if args.file and Path(args.file).is_dir():
        raise SystemExit(f"{args.file} is a folder; FILE must be a long-format CSV file")
    if (args.random is not None or args.fixed is not None) and not (args.random or args.fixed or args.asc):
        raise SystemExit("the model has no coefficients: give --random, --fixed or --asc")


def _read_csv(path: Path, sep: str = ",") -> pd.DataFrame:
    sep = "\t" if sep in ("\\t", "tab") else sep
    if not sep:
        raise SystemExit("--sep must not be empty")
    try:
        df = pd.read_csv(path, sep=sep)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: cannot be read as CSV ({e})") from None
    if len(df.columns) == 1:
        header = str(df.columns[0])
        guess = next((shown for c, shown in SEPARATORS.items() if c != sep and c in header), None)
        hint = f"; it probably uses {guess} (pass --sep {guess})" if guess else ""
        raise SystemExit(f"{path}: read with separator {sep!r} it has a single column, {header!r}{hint}")
    return df


def cmd_fit(args) -> int:
    _check_fit_args(args)
    if launched_by_torchrun() and args.method != "msl":
        raise SystemExit(f"torchrun splits --method msl over its ranks; --method {args.method} runs in one process")
    device = resolve_device(args.device or "cpu", "--device")
    if device.type == "cuda" and launched_by_torchrun():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    with torchrun_group(device) as distributed:
        return _fit_and_write(args, device, distributed)


def _fit_and_write(args, device, distributed: bool) -> int:
    lead = world()[0] == 0  # the rank that prints and writes (the only one outside torchrun)
    out = Path(args.out)
    targets = [out / n for n in RESULT_FILES]
    present = existing(out, FIT_REPLACES)
    if present and not args.overwrite:
        raise SystemExit(f"{', '.join(map(str, present))} exist; pass --overwrite to replace them or choose another "
                         "--out")
    check_folder(out, FIT_REPLACES, args.overwrite)  # the rest of what the save would refuse, before the fit
    data, random, fixed = _load_data(args)
    correlated = False
    if args.correlated == "all":
        correlated = True
    elif args.correlated:
        correlated = _parse_list(args.correlated)
    model = MixedLogit(random=random, fixed=fixed, asc=args.asc, base_alt=args.base_alt, correlated=correlated,
                       scale=args.scale)
    if lead:
        print(f"{data}\n{model}", flush=True)
    if args.method == "msl":
        res = model.fit(data, method="msl", draws=args.draws, draw_type=args.draw_type, antithetic=args.antithetic,
                        seed=args.seed, progress=lead, precision=args.precision, device=device,
                        distributed=distributed)
    elif args.method == "svi":
        res = model.fit(data, method="svi", seed=args.seed, progress=True, steps=args.steps, guide=args.guide,
                        subsample=args.subsample, learning_rate=args.learning_rate, priors=_parse_priors(args.prior))
    else:
        res = model.fit(data, method=args.method, seed=args.seed, progress=True, num_samples=args.num_samples,
                        num_warmup=args.num_warmup, chains=args.chains, priors=_parse_priors(args.prior))
    res.settings["data"] = _data_source(args) | {"rows": data.n_rows, "fingerprint": _fingerprint(res, data)}
    if not lead:
        return 0
    text = res.summary()
    with replace_folder(out, FIT_REPLACES, overwrite=args.overwrite) as tmp:
        res.save(tmp / targets[0].name)
        res.summary_frame().to_csv(tmp / targets[1].name)
        (tmp / targets[2].name).write_text(text + "\n")
    print(text)
    print(f"results written to {out}/ (results.json, params.csv, summary.txt)")
    return 0


def cmd_report(args) -> int:
    folder = Path(args.results_dir)
    path = folder / "results.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist; RESULTS_DIR must be a folder written by `mixlogit fit`")
    res = load(path)
    data = None if args.no_data else _reload_data(res.settings)
    if data is not None:
        _check_same_data(res, data, path)
    report = write_report(res, Path(args.out) if args.out else folder, data=data, fmt=args.format,
                          overwrite=args.overwrite)
    print(f"report written to {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            return cmd_fit(args)
        if args.command == "report":
            return cmd_report(args)
    except (ValueError, KeyError, OSError) as e:
        print(f"mixlogit: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
