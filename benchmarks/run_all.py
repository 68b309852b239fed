"""Run every side-by-side benchmark; with ``--write-docs``, rewrite its tables in docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/run_all.py                       # all, at 1 thread and torch's default
    .venv/bin/python benchmarks/run_all.py --only matching,postprocess --threads 2
    .venv/bin/python benchmarks/run_all.py --write-docs          # run all, then rewrite the tables
    .venv/bin/python benchmarks/run_all.py --tables-only --write-docs   # rewrite them from the JSON
    make bench                                                   # run all, print the tables

Each benchmark runs in its own process (``benchmarks/bench_<name>.py --threads N --out
benchmarks/results/<name>_t<N>.json``) and prints its table. Only ``--write-docs`` touches the
docs: the tables between the ``<!-- bench:<name> -->`` markers of docs/BENCHMARKS.md are
rewritten from every ``results/<name>_t*.json`` found; everything outside the markers (the prose)
is left as it is. Each table names the commit it measured (``git rev-parse --short HEAD``,
``+dirty`` when ``ssd/`` or ``benchmarks/`` had uncommitted changes). Results from different
commits in one docs rewrite are listed in a warning: refresh them all from one commit
(``--write-docs`` without ``--only``) before publishing.

``input_pipeline`` runs once, at 1 torch thread, whatever ``--threads`` says: its work happens in
DataLoader worker processes, which torch runs at 1 thread each, and it compares 1 and 2 loader
workers itself. It needs the VOC data (``bench_input_pipeline.DEFAULT_VOC_ROOT``) and is skipped
without it. Its docs section also gets the extra tables of ``bench_input_pipeline.extra_markdown``.

``gpu_train`` is GPU-only: skipped without a CUDA device, and run once, at torch's default thread
count (the host threads barely matter to it), with its defaults (batch 32, bf16, channels_last).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_line, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
BENCHMARKS = ("matching", "loss", "postprocess", "train_step", "input_pipeline", "gpu_train")
SCRIPTS = {name: f"bench_{name}.py" for name in BENCHMARKS}
#: benchmarks that run at these thread counts only, whatever --threads says
FIXED_THREADS = {"input_pipeline": (1,), "gpu_train": (torch.get_num_threads(),)}
#: benchmarks that need a CUDA device (skipped without one)
GPU_ONLY = {"gpu_train"}
#: benchmarks whose module ``bench_<name>`` has a function of the result JSON returning markdown
#: to put after the cases table in the docs
EXTRA_TABLES = {"input_pipeline": "extra_markdown", "gpu_train": "extra_markdown", "matching": "extra_markdown"}


def models_available() -> bool:
    """The train-step benchmark needs ``ssd.models.build_model``."""
    if importlib.util.find_spec("ssd.models") is None:
        return False
    try:
        from ssd.models import build_model  # noqa: F401
    except ImportError:
        return False
    return True


def voc_available() -> bool:
    """The input-pipeline benchmark needs real VOC data at its default location."""
    from bench_input_pipeline import DEFAULT_VOC_ROOT, IMAGE_SET, YEAR

    return (DEFAULT_VOC_ROOT / f"VOC{YEAR}" / "ImageSets" / "Main" / f"{IMAGE_SET}.txt").is_file()


def run(name: str, threads: int, extra: list[str]) -> Path:
    out = RESULTS_DIR / f"{name}_t{threads}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / SCRIPTS[name]), "--threads", str(threads)]
    cmd += ["--out", str(out.relative_to(ROOT)), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def tables(name: str) -> str:
    """Markdown for one benchmark: a table per thread count found in results/."""
    files = sorted(
        RESULTS_DIR.glob(f"{name}_t*.json"), key=lambda p: int(p.stem.rsplit("_t", 1)[1])
    )
    if not files:
        return f"_No results yet: run `python benchmarks/run_all.py --only {name}`._"
    parts = []
    extra = None
    if name in EXTRA_TABLES:
        extra = getattr(importlib.import_module(f"bench_{name}"), EXTRA_TABLES[name])
    for path in files:
        result = json.loads(path.read_text())
        s = result["settings"]
        command = re.sub(r"--out \S+ ?", "", result["command"]).strip()
        parts.append(
            f"**{result['machine']['threads']} torch thread(s)** — `{command}` "
            f"({s['warmup']} warm-up, {s['repeats']} timed repeats per side, interleaved; "
            f"run {result['date']}, **commit {result.get('library_commit', 'unrecorded')}**)  \n"
            f"Machine: {machine_line(result)}\n\n{markdown_table(result)}"
            + (f"\n\n{extra(result)}" if extra is not None else "")
        )
    return "\n\n".join(parts)


def update_doc(names: tuple[str, ...] = BENCHMARKS) -> None:
    text = DOC.read_text()
    for name in names:
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):
            print(f"warning: no {start} ... {end} markers in {DOC}; table not written")
            continue
        block = f"{start}\n{tables(name)}\n{end}"
        text = pattern.sub(lambda _, block=block: block, text)
    DOC.write_text(text)
    print(f"updated {DOC.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    parser.add_argument(
        "--threads",
        default=",".join(str(t) for t in sorted({1, torch.get_num_threads()})),
        help="comma-separated torch thread counts to run each benchmark at "
        "(default: 1 and torch's default)",
    )
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: print (with --write-docs: write) the tables of the JSON found")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"rewrite the tables in {DOC.relative_to(ROOT)} (never done without it)")
    parser.add_argument("extra", nargs="*", help="passed to every benchmark, after --")
    args = parser.parse_args(argv)
    names = tuple(n for n in args.only.split(",") if n)
    unknown = set(names) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; known: {sorted(SCRIPTS)}")
    if not args.tables_only:
        for name in names:
            if name == "train_step" and not models_available():
                print("skipping train_step: ssd.models.build_model is not importable yet")
                continue
            if name in GPU_ONLY and not torch.cuda.is_available():
                print(f"skipping {name}: no CUDA device")
                continue
            if name == "input_pipeline" and not voc_available():
                print("skipping input_pipeline: no VOC2007 data (see bench_input_pipeline.py)")
                continue
            thread_counts = [int(t) for t in args.threads.split(",")]
            if name in FIXED_THREADS:
                if thread_counts != list(FIXED_THREADS[name]):
                    print(f"{name} runs at {FIXED_THREADS[name]} torch thread(s) only")
                thread_counts = list(FIXED_THREADS[name])
            for threads in thread_counts:
                run(name, threads, args.extra)
    if args.write_docs:
        update_doc()
        warn_mixed_commits()
    elif args.tables_only:
        for name in names:
            print(f"\n## {name}\n\n{tables(name)}")
    else:
        print(f"\n{DOC.relative_to(ROOT)} not touched (pass --write-docs to rewrite its tables)")


def result_commits() -> dict[str, list[str]]:
    """commit -> the result files measured at it (every ``results/<name>_t*.json`` of the docs)."""
    commits: dict[str, list[str]] = {}
    for name in BENCHMARKS:
        for path in RESULTS_DIR.glob(f"{name}_t*.json"):
            commit = json.loads(path.read_text()).get("library_commit", "unrecorded")
            commits.setdefault(commit, []).append(path.name)
    return commits


def warn_mixed_commits() -> None:
    commits = result_commits()
    if len(commits) > 1 or any(c.endswith("+dirty") or c == "unrecorded" for c in commits):
        listing = "; ".join(f"{c}: {', '.join(sorted(files))}" for c, files in sorted(commits.items()))
        print(f"warning: the tables of {DOC.relative_to(ROOT)} are not all from one clean commit ({listing}); "
              "rerun them all with --write-docs from a clean checkout before publishing")


if __name__ == "__main__":
    main()
