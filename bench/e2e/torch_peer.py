#!/usr/bin/env python3
"""PyTorch peer of moex_e2e_bench (issue 9): the same layers, shapes and replayed routing, written
as a user would: experts' bf16 weights in pinned host memory, moved to the GPU on demand with
`.to('cuda', non_blocking=True)`, an LRU dict of GPU copies within the budget, F.silu SwiGLU.

Reads the routing that moex_e2e_bench wrote (routing.txt: batch step measured layer b e1 e2 w1 w2)
and prints/writes rows in the same units (per token scaled to --model-layers).
"""
import argparse, collections, csv, sys, time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--routing", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--model-layers", type=int, default=32)
    ap.add_argument("--csv", default="torch_peer.csv")
    a = ap.parse_args()

    steps = collections.defaultdict(lambda: collections.defaultdict(dict))  # batch -> step -> (layer) -> list
    measured = {}
    for line in open(a.routing):
        b, s, m, l, t, e1, e2, w1, w2 = line.split()
        b, s, l = int(b), int(s), int(l)
        steps[b][s].setdefault(l, []).append((int(e1), int(e2), float(w1), float(w2)))
        measured[(b, s)] = m == "1"

    H, Fd = a.hidden, a.ffn
    t0 = time.time()
    experts = {}
    g = torch.Generator(device="cuda").manual_seed(1)
    for l in range(a.layers):
        for e in range(a.experts):
            w = (torch.randn(2 * Fd + H, max(H, Fd), device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
            w1 = w[:Fd, :H].contiguous().to("cpu").pin_memory()
            w3 = w[Fd:2 * Fd, :H].contiguous().to("cpu").pin_memory()
            w2 = w[2 * Fd:, :Fd].contiguous().to("cpu").pin_memory()
            experts[(l, e)] = (w1, w3, w2)
            del w
    torch.cuda.synchronize()
    ebytes = 3 * H * Fd * 2
    print(f"torch {torch.__version__}: {len(experts)} experts x {ebytes/1e6:.1f} MB pinned in {time.time()-t0:.1f} s",
          flush=True)
    all_bytes = len(experts) * ebytes
    rows = []
    for batch in [int(x) for x in a.batches.split(",")]:
        if batch not in steps:
            continue
        order = sorted(steps[batch])
        x = torch.randn(batch, H, device="cuda", dtype=torch.bfloat16)
        for budget in [1.0] + [float(v) for v in a.budgets.split(",")]:
            slots = max(1, int(budget * all_bytes) // ebytes)
            cache = collections.OrderedDict()
            loads = hits = misses = 0

            def get(key):
                nonlocal loads, hits, misses
                if key in cache:
                    cache.move_to_end(key)
                    hits += 1
                    return cache[key]
                misses += 1
                while len(cache) >= slots:
                    cache.popitem(last=False)
                w1, w3, w2 = experts[key]
                v = (w1.to("cuda", non_blocking=True), w3.to("cuda", non_blocking=True),
                     w2.to("cuda", non_blocking=True))
                loads += 1
                cache[key] = v
                return v

            if budget >= 1.0:
                for key in experts:
                    get(key)
            t_start = None
            n_tok = 0
            for s in order:
                if measured[(batch, s)] and t_start is None:
                    torch.cuda.synchronize()
                    t_start = time.time()
                    loads = hits = misses = 0
                for l in range(a.layers):
                    routing = steps[batch][s][l]
                    out = torch.zeros(batch, H, device="cuda", dtype=torch.float32)
                    users = collections.defaultdict(list)
                    for t, (e1, e2, w1, w2) in enumerate(routing):
                        users[e1].append((t, w1))
                        users[e2].append((t, w2))
                    for e, us in users.items():
                        w1, w3, w2 = get((l, e))
                        idx = torch.tensor([u[0] for u in us], device="cuda")
                        wt = torch.tensor([u[1] for u in us], device="cuda", dtype=torch.float32)
                        xe = x[idx]
                        y = (F.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T
                        out.index_add_(0, idx, y.float() * wt[:, None])
                    out.sum().item()  # the host needs the layer's output before the next layer routes
                if measured[(batch, s)]:
                    n_tok += batch
            torch.cuda.synchronize()
            wall = time.time() - t_start
            scale = a.model_layers / a.layers
            ms = wall * 1e3 / n_tok * scale
            row = dict(batch=batch, budget=budget, row="pytorch " + ("all resident" if budget >= 1 else "on-demand LRU"),
                       tok_s=1e3 / ms, ms_per_token=ms, hit_rate=hits / max(1, hits + misses),
                       pcie_mb_per_token=loads * ebytes / n_tok * scale / 1e6)
            rows.append(row)
            print(f"| {batch} | {budget*100:.0f}% | {row['row']} | {row['tok_s']:.2f} | {ms:.1f} | "
                  f"{row['hit_rate']:.3f} | {row['pcie_mb_per_token']:.0f} |", flush=True)
            cache.clear()
            torch.cuda.empty_cache()
    with open(a.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
