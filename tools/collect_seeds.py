"""Collect finished training runs into one machine-readable results file (docs/results/flickr8k_seeds.json).

Usage:
    python tools/collect_seeds.py --out docs/results/flickr8k_seeds.json \
        --group aahr flickr8k_cpu runs/aahr_s0 runs/aahr_s1 \
        --group vse vse_baseline_flickr8k runs/vse_s0 runs/vse_s1 runs/vse_s2

Each ``--group NAME CONFIG RUN...`` becomes a list under ``NAME``, with one entry per *finished* run (a run folder
with ``test_results.json``; unfinished ones are listed on stderr and left out):
``{"seed", "config", "overrides", "dev", "test", "best_epoch", "train_seconds"}``.
- ``overrides``: derived, not typed: the ``section.key=value`` settings in which the run's saved ``config.yaml``
  differs from the shipped CONFIG (run-level keys such as the output folder, data path and threads are ignored;
  keys the run's code did not have yet are ignored).
- ``dev``: the dev recalls of the selected (best-dev) epoch, from ``metrics.jsonl``.
- ``test``: the test recalls as ``evaluate`` prints them (``test_results.json``: R@K in percent, rsum).
- ``train_seconds``: the sum of the epochs' training seconds (evaluation excluded).
- ``commit``: the code commit the runs were trained at, when given with ``--commit`` (one per invocation).
A per-group summary (mean and sample std of test and dev rsum) is printed and stored under ``"summary"``.

``--merge`` keeps what ``--out`` already holds: runs live outside the repository and do not outlive a session, so
seeds finished in different sessions are added one invocation at a time. An existing entry is replaced by a new one of
the same group, seed and overrides; every other existing entry (and group) stays, and the summaries are recomputed.
Errors (exit 2, nothing written): a run folder that does not exist or whose files are not the trainer's; ``--merge``
with an ``--out`` that is not such a results file (each entry needs an int ``seed`` and a list of str
``overrides``); a group named ``summary``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from aahr_fast.config import config_to_dict, load_config
from aahr_fast.utils.io import atomic_save_json

_IGNORED = {"run.out_dir", "run.threads", "run.device", "run.progress", "run.plots", "data.path", "data.cache_dir",
            "data.num_workers", "run.seed"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_entry(run: Path, config: str) -> dict | None:
    """One finished run as a results entry, or None when the run has no ``test_results.json`` yet."""
    if not run.is_dir():
        raise SystemExit(f"error: run folder {run} does not exist")
    if not (run / "test_results.json").is_file():
        return None
    saved = _flatten(yaml.safe_load((run / "config.yaml").read_text()))
    shipped = _flatten(config_to_dict(load_config(config)))
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(saved.items())
                 if k in shipped and k not in _IGNORED and shipped[k] != v]
    test = json.loads((run / "test_results.json").read_text())
    best_epoch = test["checkpoint"]["epoch"]
    epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in ln]
    epochs = [r for r in epochs if r.get("type") == "epoch"]
    dev = next((r["dev"] for r in epochs if r["epoch"] == best_epoch and "dev" in r), None)
    if dev is None:
        raise SystemExit(f"error: {run / 'metrics.jsonl'}: no dev metrics for the selected epoch {best_epoch}")
    return {"seed": saved["run.seed"], "config": config, "overrides": overrides, "best_epoch": best_epoch,
            "dev": dev, "test": {**test["metrics"], "protocol": test["protocol"]},
            "train_seconds": round(sum(r.get("seconds", 0.0) for r in epochs), 1)}


def _summary(entries: list[dict]) -> dict:
    out = {"runs": len(entries)}
    for split in ("test", "dev"):
        vals = [e[split]["rsum"] for e in entries]
        if vals:
            out[f"{split}_rsum_mean"] = round(statistics.fmean(vals), 2)
            out[f"{split}_rsum_std"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else None
    return out


def _key(entry: dict) -> tuple:
    return entry["seed"], tuple(entry["overrides"])


def _existing(path: Path) -> dict:
    """The groups already in ``path`` (empty when it does not exist)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        groups = {k: v for k, v in data.items() if k != "summary"}
        for name, entries in groups.items():
            for i, e in enumerate(entries):
                seed, overrides = e["seed"], e["overrides"]
                if type(seed) is not int or not isinstance(overrides, list) or \
                        not all(isinstance(o, str) for o in overrides):
                    raise ValueError(f"{name}[{i}]: expected an int seed and a list of str overrides, got "
                                     f"seed={seed!r}, overrides={overrides!r}")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SystemExit(f"error: --merge: {path} is not a results file of this tool ({exc}); "
                         "nothing was written") from None
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--group", nargs="+", action="append", required=True, metavar="NAME CONFIG RUN",
                    help="group name, shipped config name, then its run folders")
    ap.add_argument("--merge", action="store_true", help="keep the entries --out already holds (see above)")
    ap.add_argument("--commit", help="code commit of these runs, stored in each new entry")
    args = ap.parse_args(argv)
    for name, *_ in args.group:
        if name == "summary":
            raise SystemExit("error: --group summary: 'summary' is where the per-group summaries go; "
                             "name the group otherwise (nothing was written)")
    groups = _existing(Path(args.out)) if args.merge else {}
    for name, config, *runs in args.group:
        entries = {_key(e): e for e in groups.get(name, [])}
        for run in runs:
            entry = run_entry(Path(run), config)
            if entry is None:
                print(f"{name}: {run} has not finished (no test_results.json): left out", file=sys.stderr)
                continue
            if args.commit:
                entry["commit"] = args.commit
            entries[_key(entry)] = entry
        groups[name] = sorted(entries.values(), key=lambda e: (e["overrides"], e["seed"]))
    result: dict = dict(groups)
    result["summary"] = {}
    for name, entries in groups.items():
        result["summary"][name] = summary = _summary(entries)
        print(f"{name}: {summary}")
    atomic_save_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
