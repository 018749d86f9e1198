"""The export table of docs/export.md: every format and quantisation of one result, checked.

    PYTHONPATH=src python benchmarks/export_table.py RESULT [--base MODEL] [--out DIR]

RESULT is a run folder, an adapter folder or a model folder. Prints one row per format with the
file size, and per loader (transformers; peft; transformers' GGUF loader and llama.cpp through
node-llama-cpp, see docs/export.md) the logit differences, top-1 agreement, whether greedy replies
stop at the end-of-turn token, and the load time. Checks that fail are printed as such (the export
is then not kept). Load times are wall-clock on whatever else the machine runs: the load average
is printed first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from tunesmith.core.errors import TunesmithError
from tunesmith.export import export

FORMATS = (("hf", None), ("peft", None), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0"))


def stops(check) -> str:
    if not check.stops:
        return "NO"
    return "yes" if check.reference_stops else "n/a (the trained model runs to the limit too)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--base")
    parser.add_argument("--out", help="keep the exports here (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tunesmith-export-"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| format | file size | loader | max abs logit diff | % of largest logit | KL (nats) | top-1 agree | replies stop | "
          "reply tokens identical | load s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt, quantize in FORMATS:
        name = f"{fmt}-{quantize}" if quantize else fmt
        try:
            report = export(args.result, out / name, fmt, quantize, ollama=fmt == "gguf", base_model=args.base)
        except TunesmithError as error:
            print(f"| {name} | | | {str(error)[:160]} | | | | | | |")
            continue
        for loader, check in report.checks.items():
            print(f"| {name} | {report.size_bytes / 2**20:.2f} MiB | {loader} | {check.max_logit_difference:.3g} | "
                  f"{100 * check.relative_logit_difference:.3f} | {check.kl_divergence:.2e} | "
                  f"{100 * check.top1_agreement:.1f}% | {stops(check)} | "
                  f"{100 * check.reply_agreement:.0f}% | {check.load_seconds or report.load_seconds:.2f} |")
        for loader, reason in report.skipped.items():
            print(f"| {name} | | {loader} | skipped: {reason} | | | | | | |")
    if not args.out:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
