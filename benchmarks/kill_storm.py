"""Kill storm: SIGKILL training runs at random moments, resume each, compare with an uninterrupted run.

For each recipe (``big-vision``, ``lora``, ``full``) on a tiny random PaliGemma and a small
synthetic data set: one uninterrupted reference run, then ``--runs`` N runs, each SIGKILLed
(1 or 2 times, seeded) and resumed with ``train --resume`` until it ends. The kill moments:

* ``random``: a random delay after the process starts (often while loading, often mid-step);
* ``after-step``: a random delay after a random step's ``metrics.jsonl`` line appears;
* ``checkpoint-writing`` / ``checkpoint-written`` / ``pruning``: exactly there, through the
  ``PALIGEMMA_XRAY_KILL_AT`` hook of :mod:`paligemma_xray.train.run_folder` (mid-write of
  a checkpoint, after its rename but before old ones are pruned, mid-pruning), windows a
  random delay hits only by luck on a model this small.

Every run (reference, killed, resumed) is a ``paligemma-xray train`` subprocess with the
same ``OMP_NUM_THREADS`` (``--threads``): float sums depend on the thread count, and the
exactness claimed is the same-runtime one. A resumed run must end with, tensor by tensor,
the reference's ``last/`` weights (and LoRA adapter), ``best/``, and final checkpoint
(trainable weights, optimiser state, RNG, state), and with its ``metrics.jsonl`` lines
(times and speeds aside): no step lost, no line twice, no partial line.

    nice -n 10 python benchmarks/kill_storm.py --recipes big-vision lora full --runs 30 --out storm.json

JSON out: per recipe the counts (runs, kills by moment, identical, differing, lost steps,
duplicated lines) and the first differences found. Exit status 1 when any run differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

REPO = Path(__file__).resolve().parents[1]
HOOK_POINTS = ("checkpoint-writing", "checkpoint-written", "pruning")
MOMENTS = ("random", "after-step", *HOOK_POINTS)
# Times and speeds differ between any two runs; everything else in a metrics line must not.
VOLATILE = {"time", "examples_per_s"}


def prepare(work: Path) -> tuple[Path, Path]:
    """The tiny model and the synthetic data set every run trains (built once)."""
    from paligemma_xray.data.synth import generate
    from paligemma_xray.model.tiny import write_tiny_hf

    model, data = work / "model", work / "data"
    if not (model / "config.json").is_file():
        write_tiny_hf(model, version=1, seed=0)
    if not (data / "dataset").is_dir():
        generate(data, n=24, seed=0, size=224, progress=False)
    return model, data


def train_command(recipe: str, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    """``paligemma-xray train`` of one storm run: a checkpoint every step, two kept (so every
    checkpoint but the first prunes one), an evaluation every third step (``best/``)."""
    return [
        sys.executable, "-m", "paligemma_xray.cli", "train",
        "--model", str(model), "--data", str(data), "--out", str(out), "--recipe", recipe,
        "--examples", str(4 * steps), "--batch-size", "4", "--eval-max-new-tokens", "6",
        "--eval-batch-size", "8", "--checkpoint-every", "1", "--eval-every", "3", "--keep-last", "2",
        "--no-progress",
    ]  # fmt: skip


def _env(threads: int, kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    env.pop("PALIGEMMA_XRAY_KILL_AT", None)
    if kill_at:
        env["PALIGEMMA_XRAY_KILL_AT"] = kill_at
    return env


def _metric_steps(out: Path) -> list[int]:
    try:
        text = (out / "metrics.jsonl").read_text()
    except OSError:
        return []
    steps = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            steps.append(int(json.loads(line)["step"]))
    return steps


def run_killed(
    command: list[str], out: Path, threads: int, moment: str, rng: random.Random, steps: int, duration: float
) -> dict[str, Any]:
    """Run ``command`` once and SIGKILL it at ``moment``; what happened."""
    kill_at = None
    if moment in HOOK_POINTS:
        # checkpoint 1 prunes nothing (two are kept): pruning from step 3 on.
        first = 3 if moment == "pruning" else 1
        kill_at = f"{moment}:{rng.randint(first, steps)}"
    delay = rng.uniform(0.0, duration) if moment == "random" else rng.uniform(0.0, 0.5)
    after = rng.randint(1, steps) if moment == "after-step" else None
    started = time.monotonic()
    process = subprocess.Popen(
        command, env=_env(threads, kill_at), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = started + 20 * duration + 120
    seen_at: float | None = None
    while process.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        if moment == "random" and now - started >= delay:
            break
        if moment == "after-step":
            if seen_at is None and after in _metric_steps(out):
                seen_at = now
            if seen_at is not None and now - seen_at >= delay:
                break
        time.sleep(0.005)
    killed_by_us = process.poll() is None and kill_at is None
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    return {
        "moment": moment,
        "kill_at": kill_at,
        "delay_s": round(delay, 3) if kill_at is None else None,
        "after_step": after,
        "killed": killed_by_us or process.returncode == -signal.SIGKILL,
        "returncode": process.returncode,
        "stderr_tail": err.decode(errors="replace")[-400:] if process.returncode not in (0, -9) else "",
    }


def resume(command: list[str], out: Path, threads: int) -> subprocess.CompletedProcess:
    """``train --resume OUT``; a run killed before it wrote ``config.yaml`` is started again."""
    # Nothing of the run exists yet (no config.yaml): what a user does is run it again.
    argv = [*command[:4], "--resume", str(out)] if (out / "config.yaml").is_file() else command
    return subprocess.run(argv, env=_env(threads), capture_output=True, text=True)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    if not folder.is_dir():
        return found
    for file in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(file).items():
            found[f"{file.relative_to(folder)}:{key}"] = value
    return found


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return a == b


def _checkpoint(folder: Path) -> dict[str, Any]:
    """The last checkpoint's content, flattened: weights, optimiser state, RNG, state.json."""
    steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not steps:
        return {}
    last = steps[-1]
    found: dict[str, Any] = {"name": last.name}
    found.update({f"trainable:{k}": v for k, v in load_file(last / "trainable.safetensors").items()})
    found.update(_flatten(torch.load(last / "optimizer.pt", weights_only=True), "optimizer."))
    for rng_file in sorted(last.glob("rng-*.pt")):
        found.update(_flatten(torch.load(rng_file, weights_only=True), f"{rng_file.stem}."))
    state = json.loads((last / "state.json").read_text())
    found.update(_flatten(state, "state."))
    return found


def _metrics(out: Path) -> list[str]:
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)  # a partial line is a failure here: resuming must have dropped it
        lines.append(json.dumps({k: v for k, v in row.items() if k not in VOLATILE}, sort_keys=True))
    return lines


def compare(reference: Path, got: Path) -> dict[str, Any]:
    """Tensor by tensor and line by line: ``got`` against ``reference``."""
    differences: list[str] = []
    for part in ("last", "best"):
        a, b = _tensors(reference / part), _tensors(got / part)
        if a.keys() != b.keys():
            differences.append(f"{part}/: tensor names differ ({len(a)} vs {len(b)})")
        differences += [f"{part}/{k}" for k in sorted(a.keys() & b.keys()) if not _same(a[k], b[k])]
    a, b = _checkpoint(reference / "checkpoints"), _checkpoint(got / "checkpoints")
    if a.keys() != b.keys():
        differences.append(f"checkpoint: entries differ ({sorted(a.keys() ^ b.keys())[:5]})")
    differences += [f"checkpoint/{k}" for k in sorted(a.keys() & b.keys()) if not _same(a[k], b[k])]
    leftovers = [p.name for folder in (got, got / "checkpoints") for p in folder.glob(".*.tmp-*")]
    if leftovers:
        differences.append(f"temporaries left: {leftovers}")
    try:
        expected, lines = _metrics(reference), _metrics(got)
    except ValueError as error:
        return {"identical": False, "differences": [*differences, f"metrics.jsonl: {error}"],
                "lost_steps": None, "duplicated_lines": None}  # fmt: skip
    counts, wanted = Counter(lines), Counter(expected)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = sorted({json.loads(x)["step"] for x in (wanted - counts)})
    if lines != expected:
        differences.append("metrics.jsonl lines differ")
    return {
        "identical": not differences,
        "differences": differences[:10],
        "n_differences": len(differences),
        "lost_steps": lost,
        "duplicated_lines": duplicated,
    }


def storm_run(
    recipe: str, index: int, paths: dict[str, Path], reference: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """One storm run: killed (1 or 2 times), resumed to the end, compared."""
    rng = random.Random(f"{settings['seed']}-{recipe}-{index}")
    out = paths["work"] / recipe / f"run-{index:03d}"
    command = train_command(recipe, paths["model"], paths["data"], out, settings["steps"])
    kills = []
    n_kills = rng.choice((1, 1, 2))
    threads, steps, duration = settings["threads"], settings["steps"], settings["duration"]
    moments = settings["moments"]
    first = run_killed(command, out, threads, rng.choice(moments), rng, steps, duration)
    kills.append(first)
    result: dict[str, Any] = {"run": index, "kills": kills}
    for _ in range(n_kills - 1):  # a second kill, this time of the resumed run
        if not (out / "config.yaml").is_file():
            break
        again = [*command[:4], "--resume", str(out)]
        kills.append(run_killed(again, out, threads, rng.choice(moments), rng, steps, duration))
    done = resume(command, out, threads)
    result["resumed_returncode"] = done.returncode
    if done.returncode != 0:
        result.update(identical=False, differences=[f"resume failed: {done.stderr[-600:]}"])
        return result
    result.update(compare(reference, out))
    return result


def _reference(recipe: str, work: Path, model: Path, data: Path, threads: int, steps: int) -> float:
    """The uninterrupted run of ``recipe`` (kept in ``work`` for a later storm); its seconds."""
    reference, timing = work / recipe / "reference", work / recipe / "duration.json"
    if (reference / "summary.json").is_file() and timing.is_file():
        return float(json.loads(timing.read_text()))
    t0 = time.monotonic()
    command = train_command(recipe, model, data, reference, steps)
    subprocess.run([*command, "--overwrite"], env=_env(threads), check=True, capture_output=True)
    duration = time.monotonic() - t0
    timing.write_text(json.dumps(duration))
    return duration


def _counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": len(rows),
        "kills": sum(len(r["kills"]) for r in rows),
        "kills_landed": sum(k["killed"] for r in rows for k in r["kills"]),
        "kills_by_moment": dict(Counter(k["moment"] for r in rows for k in r["kills"] if k["killed"])),
        "identical": sum(bool(r.get("identical")) for r in rows),
        "differing": sum(not r.get("identical") for r in rows),
        "lost_steps": sum(len(r.get("lost_steps") or []) for r in rows),
        "duplicated_lines": sum(r.get("duplicated_lines") or 0 for r in rows),
        "failures": [r for r in rows if not r.get("identical")][:5],
        "runs_detail": [
            {
                "run": r["run"],
                "identical": r.get("identical"),
                "kills": [{k: v for k, v in kill.items() if k != "stderr_tail"} for kill in r["kills"]],
            }
            for r in rows
        ],
    }


def storm(
    recipes: list[str],
    runs: int,
    work: Path,
    *,
    seed: int = 0,
    threads: int = 1,
    steps: int = 6,
    jobs: int = 1,
    moments: tuple[str, ...] | None = None,
    on_progress: Any = None,
) -> dict[str, Any]:
    """The whole storm; the JSON-ready result.

    Runs go round the recipes (run 0 of each, then run 1, …), so that a storm stopped early
    still has counts for every recipe; ``on_progress(result)`` after each run.
    """
    moments = moments or MOMENTS
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(work)
    result: dict[str, Any] = {
        "threads": threads,
        "steps": steps,
        "seed": seed,
        "torch": torch.__version__,
        "moments": list(moments),
        "runs_per_recipe": runs,
        "recipes": {},
    }
    paths = {"work": work, "model": model, "data": data}
    settings: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        duration = _reference(recipe, work, model, data, threads, steps)
        settings[recipe] = {
            "seed": seed, "threads": threads, "steps": steps, "duration": duration, "moments": moments
        }  # fmt: skip
        result["recipes"][recipe] = {"reference_s": round(duration, 1), **_counts([])}
    rows: dict[str, list[dict[str, Any]]] = {recipe: [] for recipe in recipes}

    def one(task: tuple[int, str]) -> None:
        index, recipe = task
        row = storm_run(recipe, index, paths, work / recipe / "reference", settings[recipe])
        rows[recipe].append(row)
        result["recipes"][recipe].update(_counts(sorted(rows[recipe], key=lambda r: r["run"])))
        result["all_identical"] = all(r["differing"] == 0 for r in result["recipes"].values())
        if on_progress is not None:
            on_progress(result)

    tasks = [(index, recipe) for index in range(runs) for recipe in recipes]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, tasks))
    result["all_identical"] = all(r["differing"] == 0 for r in result["recipes"].values())
    result["complete"] = True
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["big-vision", "lora", "full"])
    parser.add_argument("--runs", type=int, default=10, help="killed-and-resumed runs per recipe")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run (batch 4)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each has --threads threads)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--moments", nargs="+", choices=MOMENTS, default=None, help="only these moments")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = parser.parse_args()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="kill-storm-"))
    t0 = time.monotonic()

    def save(partial: dict[str, Any]) -> None:
        if args.out:  # after every run: a storm stopped early keeps its counts
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**partial, "complete": False}, indent=2) + "\n")

    result = storm(
        args.recipes,
        args.runs,
        work,
        seed=args.seed,
        threads=args.threads,
        steps=args.steps,
        jobs=args.jobs,
        moments=tuple(args.moments) if args.moments else None,
        on_progress=save,
    )
    result["command"] = " ".join(sys.argv)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    write_result(result, args.out)
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
