"""Dev/test rsum of a run's checkpoint with its online encoders and with its momentum (EMA) encoders.

Used for docs/RESULTS.md ("Momentum encoders"). Copies ``img_key`` / ``txt_key`` into ``img_enc`` / ``txt_enc``
and evaluates both on the 1K protocol. Needs an AAHR run with ``model.use_moco=true``.

    python tools/ema_eval.py RUN_DIR PREPARED_DIR [--split dev] [--which best|last]
"""
import argparse

import torch

from aahr_fast.engine import evaluate_model, open_feature_split
from aahr_fast.retrieval import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run"), ap.add_argument("data")
    ap.add_argument("--split", default="dev"), ap.add_argument("--which", default="best", choices=("best", "last"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(a.run, which=a.which)
    model, cfg, cpu = loaded.model, loaded.config, loaded.device
    fs = open_feature_split(a.data, a.split)
    print(loaded.weights)
    m = evaluate_model(model, fs, cfg.model, device=cpu, batch_size=500, protocol="1k")
    print(f"online encoders:   {a.split} rsum {m['rsum']:.2f}")
    model.img_enc.load_state_dict(model.img_key.state_dict())
    model.txt_enc.load_state_dict(model.txt_key.state_dict())
    m = evaluate_model(model, fs, cfg.model, device=cpu, batch_size=500, protocol="1k")
    print(f"momentum encoders: {a.split} rsum {m['rsum']:.2f}")


if __name__ == "__main__":
    main()
