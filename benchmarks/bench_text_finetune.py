"""CPU cost of the text side of one AAHR training step: frozen MiniLM features vs fine-tuning MiniLM
(all layers, ``model.text_trainable_layers=0``, or only the top ``k``), issue 16 item 2.

A standalone script (not a pytest-benchmark: it needs the real MiniLM and ~2 minutes), run as::

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/bench_text_finetune.py --threads 1 [--json out.json]

What one "text side of a step" is, for each variant, on the same batch of ``--batch`` real Flickr8k captions
(WordPiece ids of the offline all-MiniLM-L6-v2, padded to the batch's longest caption, as the collate does):

1. ``lower = txt_enc.lower(batch)``; ``txt = txt_enc.upper(lower)`` (frozen: token features of the same
   shape, (B, L, 384), stand in for the prepared ``{split}_txt_tokens.npy`` rows);
2. backward of a stand-in loss on ``txt.fused`` and ``txt.frags`` (the real losses add no backbone work);
3. the momentum key: ``txt_key.upper(txt_key.lower(batch, shared=lower))`` under ``no_grad``;
4. AdamW step over the text encoder's trainable parameters (the backbone group at 0.1 x lr);
5. EMA of the key text encoder (``ema_update``, m = 0.999).

Everything else of the step (image side, prototypes, graph, MoCo queues) is the same for every variant and
is left out. The model is ``aahr_fast/configs/flickr8k_cpu_ft.yaml``'s (width 512) with the variant's
``text_mode`` / ``text_trainable_layers``. Variants are timed round-robin (one step of each per round, the
order rotated every round), so slow phases of a shared machine hit them alike; the median over
``--repeats`` rounds after ``--warmup`` rounds is reported, in CPU seconds of this process
(``time.process_time``, i.e. user + system of all its threads) and wall seconds.

Also reported: the ``lower`` forward alone (what caching the frozen layers' output in ``prepare`` would
save per step), the eval-mode encoding of the same captions (the per-epoch dev / final test encoding, which
fine-tuning moves from ``prepare`` into every evaluation), and the parameter counts of the trainable
backbone and of the key encoder's backbone copy.

Raises:
    SystemExit: the offline MiniLM package or the Flickr8k captions are missing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aahr_fast.config import load_config  # noqa: E402
from aahr_fast.models import build_model  # noqa: E402
from aahr_fast.models.momentum import ema_update  # noqa: E402

DIMS = dict(region_dim=1280, img_global_dim=1280, token_dim=384, txt_global_dim=384)
#: 5-epoch Flickr8k run of flickr8k_cpu(_ft): 30,000 training captions / 128 = 235 iterations per epoch
#: (the last one short); dev 5,000 captions after every epoch, test 5,000 captions once.
STEPS_PER_EPOCH, EPOCHS, EVAL_CAPTIONS = 235, 5, 5_000 * (5 + 1)


def read_captions(path: Path, n: int, seed: int) -> list[str]:
    """``n`` captions drawn at random (fixed ``seed``) from Flickr8k's ``captions.txt`` (image,caption CSV)."""
    with open(path, newline="") as fh:
        caps = [row["caption"] for row in csv.DictReader(fh)]
    g = torch.Generator().manual_seed(seed)
    return [caps[i] for i in torch.randperm(len(caps), generator=g)[:n].tolist()]


def make_batch(captions: list[str], tokenizer_backbone) -> dict:
    """Batch dict of docs/DESIGN.md for the text side: ``input_ids``, ``token_lens``, ``tokens`` (random
    frozen features of the same (B, L, 384) shape), ``txt_global``."""
    ids, lens = tokenizer_backbone.tokenize(captions)
    g = torch.Generator().manual_seed(0)
    b, length = ids.shape
    return {"input_ids": ids, "token_lens": lens, "tokens": torch.randn(b, length, 384, generator=g),
            "txt_global": torch.randn(b, 384, generator=g)}


class Variant:
    """One text-side setting: the online and key text encoders of an AAHR model, an AdamW over the online
    encoder's trainable parameters, and one timed training step (:meth:`step`)."""

    def __init__(self, name: str, overrides: list[str]):
        self.name = name
        cfg = load_config("flickr8k_cpu_ft", overrides).model
        torch.manual_seed(0)
        model = build_model(cfg, DIMS)
        model.train()
        self.enc, self.key, self.m = model.txt_enc, model.txt_key, cfg.moco_momentum
        enc_params = {id(p) for p in self.enc.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in enc_params]}
                  for g in model.param_groups(5e-4, cfg.backbone_lr_mult)]
        groups = [g for g in groups if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=5e-4, weight_decay=1e-4)
        bb = self.enc.backbone
        self.trainable_backbone = sum(p.numel() for p in bb.parameters() if p.requires_grad) if bb else 0
        kb = self.key.backbone
        self.key_backbone = sum(p.numel() for p in kb.parameters()) if kb is not None else 0

    def step(self, batch: dict) -> None:
        self.opt.zero_grad(set_to_none=True)
        low = self.enc.lower(batch)
        out = self.enc.upper(low)
        loss = out.fused.float().sum() + out.frags.float().square().mean()
        loss.backward()
        with torch.no_grad():
            self.key.upper(self.key.lower(batch, shared=low))
        self.opt.step()
        ema_update(self.key, self.enc, self.m)

    def lower_only(self, batch: dict) -> None:
        with torch.no_grad():
            self.enc.lower(batch)

    def eval_encode(self, batch: dict) -> None:
        self.enc.eval()
        with torch.no_grad():
            self.enc(batch)
        self.enc.train()


def timed(fn, batch) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn(batch)
    return time.process_time() - c0, time.perf_counter() - w0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--captions", default=str(ROOT.parent / "shared/data/flickr8k/captions.txt"))
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.captions).is_file():
        raise SystemExit(f"no Flickr8k captions at {args.captions} (--captions)")
    variants = [
        Variant("frozen features", ["model.text_mode=frozen", "model.text_trainable_layers=0"]),
        Variant("full fine-tune (k=0)", ["model.text_trainable_layers=0"]),
        Variant("top 2 layers (k=2)", ["model.text_trainable_layers=2"]),
        Variant("top 1 layer (k=1)", ["model.text_trainable_layers=1"]),
    ]
    batch = make_batch(read_captions(Path(args.captions), args.batch, seed=0), variants[1].enc.backbone)
    lens = batch["token_lens"].float()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; batch {args.batch} captions, padded length "
          f"{batch['input_ids'].shape[1]}, tokens per caption mean {lens.mean():.1f} / median "
          f"{lens.median():.0f} / max {lens.max():.0f}", flush=True)
    jobs = [(v, "step", v.step) for v in variants] + [(v, "lower", v.lower_only) for v in variants[2:]] \
        + [(v, "eval", v.eval_encode) for v in variants[:2]]
    times = {(v.name, kind): [] for v, kind, _ in jobs}
    for r in range(args.warmup + args.repeats):
        shift = r % len(jobs)
        for v, kind, fn in jobs[shift:] + jobs[:shift]:
            cpu, wall = timed(fn, batch)
            if r >= args.warmup:
                times[(v.name, kind)].append((cpu, wall))
        print(f"round {r + 1}/{args.warmup + args.repeats} done", flush=True)

    def med(name, kind, i=0):
        return statistics.median(t[i] for t in times[(name, kind)])

    base = med(variants[0].name, "step")
    rows = []
    print("\n| text side of one step | CPU-s / batch | wall-s / batch | extra CPU-s vs frozen | extra min per "
          "5-epoch run | trainable backbone params | key-encoder backbone params |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        cpu, wall = med(v.name, "step"), med(v.name, "step", 1)
        extra = cpu - base
        minutes = extra * STEPS_PER_EPOCH * EPOCHS / 60
        rows.append(dict(variant=v.name, cpu_s=cpu, wall_s=wall, extra_cpu_s=extra, extra_min_5ep=minutes,
                         trainable_backbone=v.trainable_backbone, key_backbone=v.key_backbone,
                         samples=times[(v.name, "step")]))
        print(f"| {v.name} | {cpu:.2f} | {wall:.2f} | {extra:+.2f} | {minutes:+.1f} | "
              f"{v.trainable_backbone / 1e6:.1f} M | {v.key_backbone / 1e6:.1f} M |")
    print()
    extras = {}
    for v in variants[2:]:
        low = med(v.name, "lower")
        extras[f"lower forward, {v.name}"] = low
        print(f"lower (frozen) forward alone, {v.name}: {low:.2f} CPU-s / batch = "
              f"{low * STEPS_PER_EPOCH * EPOCHS / 60:.1f} min per 5-epoch run (what caching it in prepare saves)")
    for v in variants[:2]:
        ev = med(v.name, "eval")
        extras[f"eval encode, {v.name}"] = ev
        print(f"eval-mode encoding, {v.name}: {ev:.2f} CPU-s / {args.batch} captions = "
              f"{ev * EVAL_CAPTIONS / args.batch / 60:.1f} min for 5 dev + 1 test encodings of 5,000 captions")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, extras=extras, batch=args.batch,
                                                   padded_length=int(batch["input_ids"].shape[1]),
                                                   mean_tokens=float(lens.mean()), threads=args.threads,
                                                   repeats=args.repeats, torch=torch.__version__), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
