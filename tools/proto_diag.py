"""Why the prototype branch is inert: score spread against the prototypes and Sinkhorn code entropy.

Used for docs/RESULTS.md ("Prototypes"). Encodes the first 128 dev images and one caption of each with a run's
best checkpoint, scores them against the learned prototypes, and prints the per-row score spread and the entropy of
the Sinkhorn codes (3 iterations) at several eps, against log K (uniform codes).

    python tools/proto_diag.py RUN_DIR PREPARED_DIR
"""
import argparse
import math

import torch
import torch.nn.functional as F

from aahr_fast import ops
from aahr_fast.engine import encode_split, open_feature_split
from aahr_fast.retrieval import load_model


def entropy(p: torch.Tensor) -> float:
    return float(-(p.clamp_min(1e-12).log() * p).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run"), ap.add_argument("data")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    a = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(a.run, which="best")
    model, cfg = loaded.model, loaded.config
    fs = open_feature_split(a.data, "dev")
    img, txt, cap_img = encode_split(model, fs, cfg.model, device=loaded.device, batch_size=500,
                                     max_images=128)
    protos = F.normalize(model.prototypes.weight.detach(), dim=1)
    k = protos.shape[0]
    f_v = img[torch.as_tensor(cap_img[:640:5])][:128]
    f_t = txt[:640:5][:128]
    print(f"{loaded.weights}: K = {k}, uniform code entropy log K = {math.log(k):.3f}")
    for name, x in (("image", f_v), ("text", f_t)):
        s = x @ protos.T
        print(f"{name}: score std per row {float(s.std(dim=1).mean()):.4f}, max - min {float((s.max(1).values - s.min(1).values).mean()):.3f}")
        for eps in a.eps:
            q = ops.sinkhorn(s, eps, cfg.model.sinkhorn_iters)
            q = q / q.sum(1, keepdim=True)
            print(f"  eps {eps}: code entropy {entropy(q):.3f}, mean max code {float(q.max(1).values.mean()):.3f}")
        print(f"  prediction entropy at tau {cfg.model.proto_tau}: {entropy((s / cfg.model.proto_tau).softmax(1)):.3f}")
    rand = F.normalize(torch.randn(protos.shape, generator=torch.Generator().manual_seed(0)), dim=1)
    print(f"random unit prototypes: image score std per row {float((f_v @ rand.T).std(dim=1).mean()):.4f}")


if __name__ == "__main__":
    main()
