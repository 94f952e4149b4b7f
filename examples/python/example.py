"""moex from Python (ctypes): open the demo model, run a layer and a whole step, compare with the C
example's reference, read statistics and the routing trace.

usage: python3 example.py <model dir> <reference file from examples/c>
Finds libmoex through $MOEX_LIBRARY or $MOEX_PREFIX (see moex.py)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moex  # noqa: E402

TOKENS = 4
# Same library, same inputs, one thread: the results should be identical; allow float noise only.
REL_TOL = 1e-5


def read_reference(path):
    with open(path) as f:
        head = f.readline().split()
        assert head[:2] == ["moex-ref", "2"], f"{path}: not a moex reference file (version 2)"
        tokens, hidden = int(head[2]), int(head[3])
        layer0 = [float(v) for v in f.readline().split()]
        step = [float(v) for v in f.readline().split()]
        adaptive = [float(v) for v in f.readline().split()]
    assert len(layer0) == len(step) == len(adaptive) == tokens * hidden
    return tokens, hidden, layer0, step, adaptive


def max_rel_diff(got, want):
    scale = max(abs(v) for v in want) or 1.0
    return max(abs(a - b) for a, b in zip(got, want)) / scale


def main(model_dir, ref_path):
    number, text = moex.version()
    print(f"moex {text} ({number}) via ctypes")
    tokens, hidden, ref_layer0, ref_step, ref_adaptive = read_reference(ref_path)
    assert tokens == TOKENS
    x = [((t * 131 + i * 31) % 97) / 48.5 - 1.0 for t in range(TOKENS) for i in range(hidden)]

    with moex.Model(model_dir) as model:
        info = model.info()
        print(f"model: {model.architecture()}, {info}")
        assert info["hidden"] == hidden
        with model.executor(cache_bytes=6 * info["expert_bytes"], eviction="lfu", threads=1) as ex:
            ex.record_trace()
            layer0 = ex.forward(0, x, TOKENS)
            step = ex.step(x, TOKENS)
            d0, d1 = max_rel_diff(layer0, ref_layer0), max_rel_diff(step, ref_step)
            print(f"max relative difference to the C reference: layer 0 {d0:.3g}, step {d1:.3g}")
            stats = ex.stats()
            js = json.loads(ex.stats_json())
            print(f"stats: {stats['hits']} hits, {stats['misses']} misses, hit rate {stats['hit_rate']:.2f}")
            with ex.trace() as tr:
                t, l, k, e = tr.shape()
                ids, _ = tr.arrays()
            print(f"trace: {t} tokens x {l} layers x top-{k} of {e} experts")
        # The adaptive gate with speculative prefetching, as the C example configures it.
        with model.executor(cache_bytes=6 * info["expert_bytes"], eviction="lfu", threads=1, gating="adaptive",
                            gate_threshold=0.05, prediction="speculative", prefetch_depth=1) as ad:
            astep = ad.step(x, TOKENS)
            ast = ad.stats()
        d2 = max_rel_diff(astep, ref_adaptive)
        print(f"adaptive + speculative: difference to C {d2:.3g}, {ast['skipped']} skipped, "
              f"{ast['prefetches']} prefetches, recall {ast['recall']:.2f}")
    # Errors surface as exceptions carrying the library's message.
    try:
        moex.Model(os.path.join(model_dir, "does-not-exist"))
        raise AssertionError("opening a missing model succeeded")
    except moex.MoexError as err:
        print(f"expected error: {err}")

    ok = (d0 <= REL_TOL and d1 <= REL_TOL and d2 <= REL_TOL and ast["prefetches"] > 0 and stats["hits"] + stats["misses"] > 0 and
          js["total"]["misses"] == stats["misses"] and t >= TOKENS and len(ids) == t * l * k)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
