"""learn-weights over 2 torchrun ranks against one process on one synthetic store: wall time of each and how far the
weights, λ and losses agree. A correctness run at moderate size (N rows × k columns, M groups, Q learning queries),
not a speed claim on a machine whose cores are shared.

    nice .venv/bin/python bench/bench_weights_ranks.py WORKDIR [N] [K] [M] [Q]      (defaults 50000 2048 16 200)

Both runs use 2 threads in all: one process with OMP_NUM_THREADS=2, two ranks with 1 each.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gradtrace.features.store import FeatureStore

CHUNK = 4096


def write_store(path: Path, n: int, k: int, m: int, seed: int) -> None:
    """Clustered float32 rows whose groups carry the clusters unequally (the weights have something to find)."""
    if (path / "manifest.json").exists():
        return
    w = k // m
    settings = {"model_fingerprint": "synthetic", "groups_spec": "synthetic",
                "groups": [{"name": f"g{j}", "start": j * w, "stop": (j + 1) * w, "size": w, "exact": True,
                            "params": []} for j in range(m)],
                "projection": {"kind": "synthetic"}, "measurement": {"name": "loss"}, "dtype": "float32",
                "dim": k, "chunk_rows": CHUNK, "source": {"synthetic": seed}}
    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((64, k)) * np.repeat(np.geomspace(2.0, 0.05, m), w)).astype(np.float32)
    store = FeatureStore.create(path, settings, np.arange(n) + seed * 10**7)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        x = centres[np.arange(start, stop) % 64] + rng.standard_normal((stop - start, k), dtype=np.float32)
        store.write(start, x.astype(np.float32))
    store.finish()
    store.release()


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    work = Path(sys.argv[1])
    n, k, m, q = (int(a) for a in (sys.argv[2:] + ["50000", "2048", "16", "200"][len(sys.argv) - 2:]))
    write_store(work / "train", n, k, m, 1)
    write_store(work / "queries", q, k, m, 2)
    args = ["learn-weights", "--train", str(work / "train"), "--queries", str(work / "queries"), "--method", "trak",
            "--kernel", "per-group", "--no-progress"]
    one = run([sys.executable, "-m", "gradtrace.cli", *args, "--out", str(work / "one.json")], 2)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gradtrace.cli", "--", *args, "--out", str(work / "two.json")], 1)
    a, b = (json.loads((work / f"{name}.json").read_text()) for name in ("two", "one"))
    wa, wb = np.array([a["weights"][g] for g in b["weights"]]), np.array(list(b["weights"].values()))
    pa, pb = a["provenance"], b["provenance"]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; N {n} k {k} M {m} Q {q}; "
          f"load {os.getloadavg()[0]:.1f}; path {pb['learner']['path']}")
    print(f"one process (2 threads) {one:.1f} s; 2 ranks (1 thread each) {two:.1f} s; ratio {two / one:.2f}")
    print(f"lambda_c {pb['lambda_c']} vs {pa['lambda_c']}; ranks {pa.get('ranks')}; max |Δw| / w "
          f"{np.max(np.abs(wa - wb) / wb):.2e}; loss_last {pb['loss_last']:.9f} vs {pa['loss_last']:.9f}; "
          f"pool passes {pb['learner'].get('pool', {}).get('passes')} vs {pa['learner'].get('pool', {}).get('passes')}")


if __name__ == "__main__":
    main()
