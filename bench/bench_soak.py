"""Soak: many mixed CLI invocations in a seeded random order over shared stores, some of them SIGKILLed.

    nice .venv/bin/python bench/bench_soak.py                       # 200 invocations, seed 0, up to 3 at once
    nice .venv/bin/python bench/bench_soak.py --invocations 40 --seed 1 --json soak.json

One process imports `gradtrace.cli` (one torch thread, no torch work of its own) and forks one child per
invocation, `python -m gradtrace.cli ARGV` minus the import; up to `--parallel` children run at once over one
set of shared folders: a training store and a query store (featurize writers, resumed after kills), attribute
runs reading them while writers run, merge-features of the training store into merged stores, a second writer
on a store another one holds, featurize --overwrite (the store starts over), and featurize under two torch threads
(another numerics) on an unfinished store that has rows.
A writer is SIGKILLed at a random moment with probability `--kill`.

Every invocation must end in exit code 0, a SIGKILL the soak sent, or exit code 2 with exactly one line on
stderr and no traceback; an attribute run that succeeds must equal the clean run's bytes (top-k ids and scores).
At the end every store is finished by running its command once more (no kill) and must be complete and
byte-identical to a clean run's, or be refused in one line. Prints a summary and writes it as JSON.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from gradtrace.cli import main  # noqa: E402  (after the thread count, as every child inherits it)

FEAT = ["--dim", "64", "--timesteps", "4", "--chunk", "4"]
STORE_FILES = ("features.npy", "ids.npy")
RUN_FILES = ("topk_ids.npy", "topk_scores.npy")


class Child:
    def __init__(self, op: str, argv: list, log: Path, threads: int = 1, kill_at: float | None = None,
                 target: Path | None = None):
        self.op, self.argv, self.log, self.kill_at, self.target = op, [str(a) for a in argv], log, kill_at, target
        log.touch()  # the child may be killed before it opens its log
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:  # the child: `gradtrace ARGV` with its output in the log
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            torch.set_num_threads(threads)
            try:
                code = main(self.argv + ["--no-progress"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        self.code: int | None = None
        self.killed = False

    def poll(self) -> bool:
        if self.code is None:
            if self.kill_at is not None and not self.killed and time.monotonic() - self.started >= self.kill_at:
                os.kill(self.pid, signal.SIGKILL)
                self.killed = True
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code is not None

    def wait(self) -> int:
        while not self.poll():
            time.sleep(0.01)
        return self.code


def run(op: str, argv: list, log: Path) -> int:
    return Child(op, argv, log).wait()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def has_rows(store: Path) -> bool:
    """True when some chunk of an unfinished store is recorded (a writer under other numerics is then refused)."""
    try:
        if json.loads((store / "manifest.json").read_text()).get("status") == "complete":
            return False
    except (OSError, ValueError):
        return False
    for file in store.glob("progress*.json"):
        try:
            if json.loads(file.read_text()).get("chunks"):
                return True
        except (OSError, ValueError):
            pass
    return False


def soak(root: Path, invocations: int, seed: int, parallel: int, p_kill: float) -> dict:
    logs = root / "logs"
    logs.mkdir(parents=True)
    ck, ref, work = root / "ckpt", root / "ref", root / "work"
    assert run("setup", ["train", "--data", "digits", "--n", 96, "--steps", 20, "--batch-size", 16, "--out", ck],
               logs / "train.log") == 0
    commands = {
        "train": ["featurize", "--checkpoint", ck, "--out", "{out}", *FEAT],
        "queries": ["featurize", "--checkpoint", ck, "--data", "digits", "--n", 48, "--out", "{out}", *FEAT],
    }

    def argv(kind: str, out: Path) -> list:
        return [out if a == "{out}" else a for a in commands[kind]]

    for kind in commands:
        assert run("setup", argv(kind, ref / kind), logs / f"ref-{kind}.log") == 0
    attr = ["attribute", "--train", "{train}", "--queries", "{queries}", "--top-k", 5, "--lambda-c", 0.1]
    assert run("setup", [a.format(train=ref / "train", queries=ref / "queries") if isinstance(a, str) else a
                         for a in attr] + ["--out", ref / "attr"], logs / "ref-attr.log") == 0

    rng = random.Random(seed)
    ops = ["featurize"] * 4 + ["attribute"] * 4 + ["merge"] * 2 + ["second-writer", "overwrite"] + ["two-threads"] * 2
    live: list[Child] = []
    outcomes: collections.Counter = collections.Counter()
    problems: list[str] = []
    refusals: collections.Counter = collections.Counter()
    after_kill: list[Path] = []  # stores a writer was killed in: the next invocation may be a two-thread writer
    start = time.monotonic()

    def settle(child: Child) -> None:
        text = child.log.read_text(errors="replace").strip()
        lines = [line for line in text.splitlines() if line.strip()]
        if child.killed and child.code == -signal.SIGKILL:
            outcome = "killed"
            if child.target is not None and child.op in ("featurize", "overwrite"):
                after_kill.append(child.target)
        elif child.code == 0:
            outcome = "ok"
            if child.op == "attribute":
                out = Path(child.argv[child.argv.index("--out") + 1])
                if any(sha(out / f) != sha(ref / "attr" / f) for f in RUN_FILES):
                    problems.append(f"{child.log.name}: attributions differ from the clean run's")
        elif child.code == 2 and len(lines) == 1 and "Traceback" not in text:
            outcome = "refused"
            words = lines[0].split(": error: ", 1)[-1]
            refusals[" ".join(words.replace(str(root), "ROOT").split()[:7])] += 1
        else:
            outcome = "bad"
            problems.append(f"{child.log.name}: exit {child.code}, {len(lines)} lines: {text[-300:]}")
        outcomes[(child.op, outcome)] += 1

    for i in range(invocations):
        while len(live) >= parallel:
            for child in [c for c in live if c.poll()]:
                live.remove(child)
                settle(child)
            time.sleep(0.01)
        op = rng.choice(ops)
        kind = rng.choice(list(commands))
        if after_kill and rng.random() < 0.5:  # after a kill, the store may stay unfinished
            op, kind = "two-threads", after_kill.pop(0).name
        kill_at = rng.uniform(0.05, 4.0) if rng.random() < p_kill else None
        log = logs / f"{i:03d}-{op}.log"
        if op == "featurize":
            child = Child(op, argv(kind, work / kind), log, kill_at=kill_at, target=work / kind)
        elif op == "second-writer":
            child = Child(op, argv(kind, work / kind), log, target=work / kind)
        elif op == "overwrite":  # start the store over (refused while another writer holds it)
            child = Child(op, argv(kind, work / kind) + ["--overwrite"], log, kill_at=kill_at, target=work / kind)
        elif op == "two-threads":  # an unfinished store with rows of one thread, once its writers are done
            deadline = time.monotonic() + 30
            while any(c.target == work / kind and not c.poll() for c in live) and time.monotonic() < deadline:
                time.sleep(0.01)
            started = [kind] if has_rows(work / kind) else []
            if not started:
                child = Child("featurize", argv(kind, work / kind), log, kill_at=kill_at, target=work / kind)
            else:
                child = Child(op, argv(started[0], work / started[0]), log, threads=2, target=work / started[0])
        elif op == "merge":
            child = Child(op, ["merge-features", "--shard", work / "train", "--out", work / f"merged-{i % 2}"], log,
                          kill_at=kill_at)
        else:
            child = Child(op, [a.format(train=work / "train", queries=work / "queries") if isinstance(a, str) else a
                               for a in attr] + ["--out", work / f"attr-{i % 3}"], log, kill_at=kill_at)
        live.append(child)
    for child in live:
        child.wait()
        settle(child)
    soak_s = time.monotonic() - start

    final = {}
    for name in ("train", "queries", "merged-0", "merged-1"):
        store = work / name
        log = logs / f"final-{name}.log"
        cmd = argv(name, store) if name in commands else ["merge-features", "--shard", work / "train", "--out", store]
        code = run("final", cmd, log)
        lines = log.read_text().strip().splitlines()
        ref_store = ref / (name if name in commands else "train")
        if code == 0 and all(sha(store / f) == sha(ref_store / f) for f in STORE_FILES) and \
                json.loads((store / "manifest.json").read_text())["status"] == "complete":
            final[name] = "complete, byte-identical"
        elif code == 2 and len(lines) == 1:
            final[name] = f"refused: {lines[0][:160]}"
        else:
            final[name] = f"BAD: exit {code}"
            problems.append(f"final {name}: exit {code}: {' '.join(lines)[-300:]}")
    return {"invocations": invocations, "seed": seed, "parallel": parallel, "p_kill": p_kill,
            "soak_wall_s": round(soak_s, 1),
            "outcomes": {f"{op} {outcome}": n for (op, outcome), n in sorted(outcomes.items())},
            "refusals": dict(refusals.most_common()), "final": final, "problems": problems}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--invocations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--kill", type=float, default=0.35, help="probability that a writer is SIGKILLed")
    ap.add_argument("--json", default=None, help="write the summary here too")
    ap.add_argument("--keep", action="store_true", help="keep the soak's folders (printed)")
    return ap.parse_args()


if __name__ == "__main__":
    args = parse()
    root = Path(tempfile.mkdtemp(prefix="gradtrace-soak-"))
    try:
        summary = soak(root, args.invocations, args.seed, args.parallel, args.kill)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(1 if summary["problems"] else 0)
