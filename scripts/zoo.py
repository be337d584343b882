"""Run the torchvision zoo test architecture by architecture, resumably, and write its table (`make zoo-report`).

`tests/test_zoo.py` prunes every classification builder of torchvision four ways; run as one pytest session it
takes hours, loses everything to one crash and says nothing about time or memory per architecture. This runs one
pytest process per architecture (one torch thread each), `--jobs` at a time, with a time limit per architecture,
and keeps each one's output in `--out` (`ARCH.log`). An architecture whose log records a finished run of the same
commit is not run again (unless a shorter time limit stopped it), so an interrupted run resumes where it stopped.
Architectures over `--alone-over` parameters run after the others, one at a time: the test's float64 copies of
ViT-H/14 peak at 20-22 GB.

The table (`--table`, markdown) gives per architecture its parameters, each run's outcome and seconds (the setup,
one trace of the model shared by the four runs, apart), the wall time and the peak resident memory of its process.

Run in the zoo environment: .venv-zoo/bin/python scripts/zoo.py [--jobs 2] [--only resnet18,vgg11] [--limit 1800]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("mipp-confidence", "mipp-0.5", "random-0.5", "tp-l1-0.5")  # the test's parameter ids, in its order
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED) tests/test_zoo\.py::\S+\[(?P<arch>[^\]]+?)-(?P<run>"
                     + "|".join(re.escape(r) for r in RUNS) + r")\]", re.M)
DURATION = re.compile(r"^(?P<seconds>[\d.]+)s (?P<phase>call|setup)\s+tests/test_zoo\.py::\S+\[[^\]]+?-(?P<run>"
                      + "|".join(re.escape(r) for r in RUNS) + r")\]", re.M)


def commit() -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    name = head.stdout.strip() or "unknown"
    return name + ("+changes" if dirty.stdout.strip() else "")


def architectures() -> list[tuple[str, int]]:
    """(name, parameters) of every classification builder, from torchvision's weight metadata (no model built)."""
    import torchvision

    found = []
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        weights = list(torchvision.models.get_model_weights(name))
        found.append((name, int(weights[0].meta["num_params"]) if weights else 0))
    return found


def read_log(path: Path) -> dict | None:
    """What a log records: its commit, each run's outcome and seconds, setup seconds, wall seconds, peak MB;
    None when there is no log or it holds no finished run."""
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    header = re.search(r"^commit: (\S+)", text, re.M)
    wall = re.search(r"^wall seconds: ([\d.]+)", text, re.M)
    peak = re.search(r"^peak MB: (\d+)", text, re.M)
    status = re.search(r"^exit status: (-?\d+)", text, re.M)
    limit = re.search(r"^time limit reached: ([\d.]+) s", text, re.M)
    if header is None or wall is None:
        return None
    outcomes = {m["run"]: m[1].lower() for m in OUTCOME.finditer(text)}
    seconds = {m["run"]: float(m["seconds"]) for m in DURATION.finditer(text) if m["phase"] == "call"}
    setup = sum(float(m["seconds"]) for m in DURATION.finditer(text) if m["phase"] == "setup")
    return {"commit": header[1], "outcomes": outcomes, "seconds": seconds, "setup": setup, "wall": float(wall[1]),
            "peak_mb": int(peak[1]) if peak else None, "status": int(status[1]) if status else None,
            "timed_out": limit is not None, "limit": float(limit[1]) if limit else None}


def run_one(name: str, out: Path, limit: float, revision: str) -> None:
    """One architecture's four runs in a pytest process of its own; its output, wall time and peak memory to
    ARCH.log (written under another name first, so a log is complete or absent)."""
    partial = out / f"{name}.log.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "zoo", "tests/test_zoo.py",
               "-k", f"[{name}-", "-v", "-rA", "--durations=0"]
    started = time.perf_counter()
    with open(partial, "w") as log:
        log.write(f"commit: {revision}\narchitecture: {name}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline, status, usage = started + limit, None, None
        while status is None:
            pid, code, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(code)
            elif time.perf_counter() > deadline:
                process.kill()
                _, code, usage = os.wait4(process.pid, 0)
                status = os.waitstatus_to_exitcode(code)
                log.write(f"\ntime limit reached: {limit:.0f} s\n")
            else:
                time.sleep(1.0)
        process.returncode = status  # reaped here: stop Popen from waiting for it again
        log.write(f"\nexit status: {status}\nwall seconds: {time.perf_counter() - started:.1f}\n"
                  f"peak MB: {usage.ru_maxrss // 1024}\n")
    partial.replace(out / f"{name}.log")


def table(found: list[tuple[str, int]], out: Path) -> str:
    """The markdown table of every architecture's latest log (those not run say so)."""
    lines = ["| architecture | parameters (M) | " + " | ".join(RUNS) + " | setup s | wall s | peak GB | commit |",
             "|---|---:|" + "---|" * len(RUNS) + "---:|---:|---:|---|"]
    passed = 0
    for name, params in found:
        record = read_log(out / f"{name}.log")
        if record is None:
            lines.append(f"| {name} | {params / 1e6:.1f} | " + " | ".join("not run" for _ in RUNS) + " | | | | |")
            continue
        cells = []
        for run in RUNS:
            outcome = record["outcomes"].get(run, "time limit" if record["timed_out"] else "not reached")
            seconds = record["seconds"].get(run)
            cells.append(outcome if seconds is None else f"{outcome} ({seconds:.0f} s)")
        passed += all(record["outcomes"].get(run) == "passed" for run in RUNS)
        peak = "" if record["peak_mb"] is None else f"{record['peak_mb'] / 1024:.1f}"
        lines.append(f"| {name} | {params / 1e6:.1f} | " + " | ".join(cells)
                     + f" | {record['setup']:.0f} | {record['wall']:.0f} | {peak} | {record['commit']} |")
    summary = f"{passed} of {len(found)} architectures passed all four runs."
    return summary + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="architectures at a time (one thread each)")
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds per architecture's four runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo", help="folder of the logs")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table here too")
    parser.add_argument("--only", default="", help="comma-separated architectures (default: every one)")
    parser.add_argument("--alone-over", type=float, default=250e6,
                        help="parameters above which an architecture runs alone, after the others")
    parser.add_argument("--report", action="store_true", help="only print (and write) the table of the logs")
    args = parser.parse_args(argv)
    found = architectures()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in found}
        if unknown:
            parser.error(f"not torchvision classification builders: {', '.join(sorted(unknown))}")
        found = [(name, params) for name, params in found if name in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        text = table(found, args.out)
        print(text)
        write_table(args, text)
        return 0
    revision = commit()
    records = {name: read_log(args.out / f"{name}.log") for name, _ in found}
    todo = [(name, params) for name, params in found  # not run at this commit, or cut by a shorter time limit
            if records[name] is None or records[name]["commit"] != revision
            or (records[name]["timed_out"] and records[name]["limit"] < args.limit)]

    def expected_seconds(item):  # the longest first, so that the last to finish are short: a previous log's wall
        record = records[item[0]]  # time where there is one, else the parameters
        return (record["wall"] if record else 0.0, item[1])

    shared = sorted((t for t in todo if t[1] <= args.alone_over), key=expected_seconds, reverse=True)
    alone = [t for t in todo if t[1] > args.alone_over]
    print(f"zoo at {revision}: {len(found) - len(todo)} of {len(found)} already run, {len(shared)} to run "
          f"{args.jobs} at a time, {len(alone)} alone; logs in {args.out}", flush=True)

    def one(item):
        name, _ = item
        run_one(name, args.out, args.limit, revision)
        record = read_log(args.out / f"{name}.log")
        done = sum(record["outcomes"].get(run) == "passed" for run in RUNS)
        print(f"{name}: {done} of {len(RUNS)} passed in {record['wall']:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, shared))
    for item in alone:
        one(item)
    text = table(found, args.out)
    print(text)
    write_table(args, text)
    return 0


def write_table(args, text: str) -> None:
    if args.table is not None:
        args.table.write_text(f"# The torchvision zoo, architecture by architecture\n\nWritten by `scripts/zoo.py` "
                              "from one log per architecture; the README's section on the zoo says what each run "
                              f"checks.\n\n{text}")


if __name__ == "__main__":
    sys.exit(main())
