"""tunesmith on a busy machine: tokens/s beside a competing busy process, against the same run quiet.

One invocation runs every thread policy quiet and beside a competitor that this script starts
itself (bounded in time and stopped when the run ends), interleaved, ``--repeats`` times, and
prints per policy: quiet tokens/s, busy tokens/s, busy/quiet, and quiet tokens/s against torch's
own default (how much the policy costs when nothing else runs).

    python benchmarks/busy.py                    # tunesmith's loop on a small generated model (XS)
    python benchmarks/busy.py --workload cli     # `tunesmith train` on SmolLM2-135M-Instruct + alpaca demo
    python benchmarks/busy.py --policies torch,tunesmith,passive,spin=10000,threads=1

Policies:
    torch       torch's defaults: every core, OpenMP threads spin before they sleep (libgomp: 300,000 spins)
    tunesmith   what the CLI does at start (:func:`tunesmith.core.runtime.configure_threads`)
    passive     OMP_WAIT_POLICY=PASSIVE, every core
    spin=N      GOMP_SPINCOUNT=N, every core
    threads=N   torch.set_num_threads(N), torch's wait policy

Competitors (``--competitor``): ``python`` (one busy Python loop, one core), ``torch`` (a float32
matrix-product loop with torch's default threads and wait policy, as a second job started
without tunesmith would be). On a shared machine only ratios measured in one invocation mean
anything; the script prints the load average before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
COMPETITOR_SECONDS = 900  # upper bound on a competitor's life, even if this script is killed

COMPETITORS = {
    "python": "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n",
    "torch": ("import time, torch\na = torch.randn(1024, 1024)\nend = time.time() + {seconds}\n"
              "while time.time() < end:\n    a @ a\n"),
}


def policy_environment(policy: str) -> dict[str, str]:
    """Environment of a worker for ``policy`` (the thread variables of this shell are removed first)."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    env["PYTHONPATH"] = str(REPO / "src")
    if policy == "torch":
        # libgomp's own default spin count, set explicitly: it also tells tunesmith's CLI policy
        # that the user chose a wait policy, so the CLI workload keeps torch's behaviour.
        env["GOMP_SPINCOUNT"] = "300000"
    elif policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spin="):
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    elif policy.startswith("threads="):
        env["OMP_NUM_THREADS"] = policy.split("=", 1)[1]
        env["GOMP_SPINCOUNT"] = "300000"
    elif policy != "tunesmith":
        raise SystemExit(f"unknown policy {policy!r}")
    return env


# ---------------------------------------------------------------- workloads (subprocess)

def loop_worker(policy: str, steps: int, size: str) -> dict:
    """tunesmith's loop on a generated model (LoRA, autocast auto), timed per step; prints its tokens/s."""
    if policy == "tunesmith":
        from tunesmith.core.runtime import configure_threads

        configure_threads()
    sys.path.insert(0, str(HERE))
    import speed  # imports torch: after the policy's environment is in place

    model = speed.build_model(size)
    examples = speed.build_examples(size, speed.BATCH * steps)
    stamps, _ = speed.run_tunesmith(model, examples, steps, True, {"autocast": "auto"})
    tokens = sum(len(e.input_ids) for e in examples[speed.BATCH:])  # step 1 is warm-up
    import torch

    return {"tokens_per_s": tokens / (stamps[-1] - stamps[0]), "threads": torch.get_num_threads()}


def cli_recipe(folder: Path, steps: int) -> Path:
    """The LoRA recipe of ``speed.py --model smollm2``: SmolLM2-135M-Instruct on the alpaca demo set."""
    sys.path.insert(0, str(HERE))
    import speed

    path = folder / "recipe.yaml"
    path.write_text(json.dumps(speed.smollm2_recipe(folder, "lora", steps, {})))  # JSON is YAML
    return path


def run_cli_workload(policy: str, steps: int) -> dict:
    """`tunesmith train` in its own process; tokens/s from metrics.jsonl, first step excluded."""
    with tempfile.TemporaryDirectory() as folder:
        recipe = cli_recipe(Path(folder), steps)
        done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(recipe), "--no-progress"],
                              env=policy_environment(policy), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"tunesmith train failed ({policy}):\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if "tokens_per_s" in r and r["step"] > 1]
        tokens = sum(r["tokens"] - previous["tokens"] for previous, r in zip(records, records[1:]) if r in timed)
        seconds = sum((r["tokens"] - previous["tokens"]) / r["tokens_per_s"]
                      for previous, r in zip(records, records[1:]) if r in timed)
        return {"tokens_per_s": tokens / seconds, "threads": "torch's"}


def run_workload(workload: str, policy: str, steps: int) -> dict:
    if workload == "cli":
        return run_cli_workload(policy, steps)
    done = subprocess.run([sys.executable, __file__, "--worker", "--policy", policy, "--steps", str(steps),
                           "--size", workload],
                          env=policy_environment(policy), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({policy}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_competitor(kind: str) -> subprocess.Popen:
    """A competing busy process, alive at most COMPETITOR_SECONDS; the caller stops it."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    process = subprocess.Popen([sys.executable, "-c", COMPETITORS[kind].format(seconds=COMPETITOR_SECONDS)], env=env)
    time.sleep(1.0)  # let it reach its loop
    return process


def measure(workload: str, policy: str, steps: int, competitor: str | None) -> dict:
    process = start_competitor(competitor) if competitor else None
    try:
        return run_workload(workload, policy, steps)
    finally:
        if process is not None:
            process.terminate()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("quick", "XS", "S", "cli"), default="XS",
                        help="a generated model of speed.py (quick: 2 layers, hidden 128; XS: 4 layers, hidden 256; "
                        "S: 8 layers, hidden 512) through tunesmith's loop, or `tunesmith train` on SmolLM2")
    parser.add_argument("--policies", default="torch,tunesmith", help="comma-separated, see above")
    parser.add_argument("--competitor", choices=tuple(COMPETITORS), default="python")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(loop_worker(args.policy, args.steps, args.size)))
        return
    policies = args.policies.split(",")
    print(f"workload {args.workload}; competitor {args.competitor}; {args.steps} steps; {args.repeats} repeats; "
          f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {}
    for repeat in range(args.repeats):
        for policy in policies:
            for condition in ("quiet", "busy"):
                run = measure(args.workload, policy, args.steps, args.competitor if condition == "busy" else None)
                results.setdefault((policy, condition), []).append(run["tokens_per_s"])
                print(f"repeat {repeat + 1} {policy:12} {condition:5}: {run['tokens_per_s']:7.1f} tokens/s "
                      f"(threads {run['threads']}; load {os.getloadavg()[0]:.2f})", flush=True)
    print()
    print(report(results, policies, args.competitor))


def report(results: dict, policies: list[str], competitor: str) -> str:
    """Markdown table: medians, busy/quiet per policy, quiet against torch's default."""
    med = {key: statistics.median(values) for key, values in results.items()}
    baseline = med.get(("torch", "quiet"))
    lines = [f"| policy | quiet tokens/s | beside a busy {competitor} process | **busy/quiet** | quiet vs torch default |",
             "|---|---|---|---|---|"]
    for policy in policies:
        quiet, busy = med[(policy, "quiet")], med[(policy, "busy")]
        versus = f"{quiet / baseline:.2f}×" if baseline else ""
        lines.append(f"| {policy} | {quiet:.0f} | {busy:.0f} | **{busy / quiet:.2f}×** | {versus} |")
    per_repeat = "; ".join(f"{policy}: " + ", ".join(f"{b / q:.2f}×" for q, b in
                                                      zip(results[(policy, 'quiet')], results[(policy, 'busy')]))
                           for policy in policies)
    return "\n".join(lines) + f"\n\nbusy/quiet per repeat: {per_repeat}"


if __name__ == "__main__":
    main()
