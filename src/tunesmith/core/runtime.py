"""The environment, read in one place: threads, device, distributed rank and world size, cache folder.

Nothing else in tunesmith reads environment variables; the results are passed along explicitly.
torch is imported inside the functions that need it, so that :func:`configure_threads` can set
OpenMP's environment before torch loads the OpenMP runtime (which reads it once, when it loads).
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    import torch

from tunesmith.core.errors import TunesmithError

# Variables through which a user chooses OpenMP's threads or wait policy; tunesmith keeps theirs.
WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Spins of an idle OpenMP thread before it sleeps (libgomp's default: 300,000). Measured on SmolLM2
# training, 2 cores, against torch's default in the same run: 2,000 kept 1.03x and 1.09x its quiet
# tokens/s and 0.49x and 0.51x of quiet beside a busy process (torch's default 0.32-0.33x); 500 kept
# more under load (0.58-0.64x) but 0.92-1.02x quiet; PASSIVE 0.89x quiet (benchmarks/RESULTS.md).
SPIN_COUNT = 2000


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs.

    Attributes:
        device: The torch device the model lives on.
        rank: Global rank of this process (0 when not distributed).
        local_rank: Rank on this machine.
        world_size: Number of processes training together.
        cache: tunesmith's cache folder (converted models, prepared data, Fisher estimates).
    """

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    cache: Path = field(default_factory=lambda: cache_dir())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0


def thread_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP variables tunesmith sets before torch loads, unless the user chose their own.

    OpenMP's threads spin-wait for work between parallel regions (libgomp: 300,000 spins before
    they sleep). Where another process keeps a core busy, a spinning thread takes that core's time
    from the thread that has the work, and each step waits for the slowest thread: beside one busy
    process tunesmith kept a third of its tokens/s, beside a second torch job steps were up to 18
    times slower. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) cured that but cost 11% on a quiet
    machine (a futex wake-up per parallel region); a short spin of ``SPIN_COUNT`` keeps the quiet
    speed and half of two cores beside one busy process (``benchmarks/busy.py`` measures both sides; figures in
    ``benchmarks/RESULTS.md``). A user who sets ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or
    ``KMP_BLOCKTIME`` keeps it.
    """
    if any(name in environ for name in WAIT_POLICY_VARIABLES):
        return {}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def configure_threads() -> str:
    """Set OpenMP's wait policy for this process; the CLI calls it first, before torch is imported.

    OpenMP reads its environment once, when torch loads it, so this takes effect only before the
    first ``import torch``. Returns what was chosen, for the log.
    """
    chosen = thread_environment(os.environ)
    os.environ.update(chosen)
    if chosen:
        return f"threads: idle OpenMP threads spin {SPIN_COUNT} times, then sleep (GOMP_SPINCOUNT={SPIN_COUNT})"
    return "threads: OpenMP wait policy as set in the environment (" + ", ".join(
        f"{name}={os.environ[name]}" for name in WAIT_POLICY_VARIABLES if name in os.environ) + ")"


def keep_bitsandbytes_out() -> bool:
    """Keep bitsandbytes out of this process, for a command that loads no model quantised through it; whether
    it is out (False when something imported it already).

    peft imports bitsandbytes whenever it is installed (``peft.helpers``), and that import cost 5-6 s of a
    LoRA run's start here (0.8-1.1 s for the rest of peft, busy machine; benchmarks/RESULTS.md, session 12): it
    loads torch's inductor and, on a CPU with AVX-512 BF16, asks the hub for a kernel
    (kernels-community/quantization-bitsandbytes) on every import, logging a warning when that fails. Neither
    library has a setting that skips either. ``None`` in ``sys.modules`` is Python's own marker for a module that
    cannot be imported (the import raises ModuleNotFoundError, ``importlib.util.find_spec`` answers None), so
    peft and transformers see bitsandbytes as not installed. That cannot be undone in the process (peft caches
    the answer), hence only for a command that will quantise nothing: see :func:`bitsandbytes_kept_out`.
    """
    if sys.modules.get("bitsandbytes") is not None:
        return False
    sys.modules["bitsandbytes"] = None
    return True


def bitsandbytes_kept_out() -> bool:
    """Whether :func:`keep_bitsandbytes_out` kept bitsandbytes out of this process."""
    return "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None


def cache_dir() -> Path:
    """tunesmith's cache: ``$TUNESMITH_CACHE``, else ``$XDG_CACHE_HOME/tunesmith``, else ``~/.cache/tunesmith``."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunesmith"


def node_llama_cpp_dir() -> Path:
    """The ``node_modules`` folder where the export check looks for the npm package ``node-llama-cpp``.

    ``$TUNESMITH_NODE_LLAMA_CPP`` (the ``--prefix`` folder of ``npm install``, or its ``node_modules``),
    else ``node/node_modules`` in tunesmith's cache (docs/export.md has the install command).
    """
    folder = Path(os.environ["TUNESMITH_NODE_LLAMA_CPP"]) if os.environ.get("TUNESMITH_NODE_LLAMA_CPP") else (
        cache_dir() / "node")
    return folder if folder.name == "node_modules" else folder / "node_modules"


def gguf_converter_dir() -> Path:
    """Where llama.cpp's ``convert_hf_to_gguf.py`` is installed (:mod:`tunesmith.export.convert`).

    ``$TUNESMITH_GGUF_CONVERTER``, else ``gguf-converter`` in tunesmith's cache.
    """
    if os.environ.get("TUNESMITH_GGUF_CONVERTER"):
        return Path(os.environ["TUNESMITH_GGUF_CONVERTER"])
    return cache_dir() / "gguf-converter"


def check_device(spec: str, setting: str = "--device") -> None:
    """Refuse a device this machine does not have (``cuda`` without a GPU, ``cuda:3`` of two, ``gpu``).

    Args:
        spec: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        setting: How the user gave it (flag or recipe field), for the message.

    Raises:
        TunesmithError: Naming the setting and what to use instead.
    """
    import torch

    kind, _, index = spec.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise TunesmithError(f"{setting} {spec!r} is not a device; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TunesmithError(f"{setting} {spec} asks for a CUDA GPU, but this machine has none that torch can use; "
                             "use cpu (or install a CUDA build of torch)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise TunesmithError(f"{setting} {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0; use cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def pick_device(preference: str = "auto", local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """``auto`` is the GPU of this local rank when CUDA is available, else the CPU.

    Raises:
        TunesmithError: For ``cuda`` on a machine without a usable GPU.
    """
    import torch

    check_device(preference, setting)
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(device_preference: str = "auto") -> Runtime:
    """Read the launcher's environment (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) and join the group.

    Uses nccl on GPUs and gloo on the CPU.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size)


def memory_for_each_process(runtime: Runtime) -> Optional[int]:
    """Bytes one process of the run may plan on, the same number in every process.

    :func:`available_memory_bytes` of this process's device; on the CPU the machine's memory is shared by the
    processes torchrun started on it (``LOCAL_WORLD_SIZE``), a GPU's belongs to its one process. Under torchrun
    the least over all processes (an all-reduce), so that no process plans on more than another sees; None
    where any process cannot tell.
    """
    import torch

    available = available_memory_bytes(runtime.device)
    if not runtime.distributed:
        return available
    sharing = 1 if runtime.device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    least = torch.tensor([-1 if available is None else available // sharing], dtype=torch.int64,
                         device=runtime.device)
    torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
    return None if int(least) < 0 else int(least)


def from_main_process(runtime: Runtime, value):
    """``value`` as the main process holds it, in every process (a broadcast; ``value`` itself in one process).

    For what one process decides for all: the others pass anything (None) and receive the main process's.
    """
    import torch

    if not runtime.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=runtime.device)
    return box[0]


def shutdown_runtime(runtime: Runtime) -> None:
    """Leave the process group if this process joined one."""
    import torch

    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else this process's peak resident memory."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        # VmHWM is this process's own peak; ru_maxrss would include a parent's memory, which Linux
        # carries across fork + exec (runs started by `tunesmith compare` or a benchmark driver).
        line = next((l for l in status.read_text().splitlines() if l.startswith("VmHWM:")), None)
        if line:
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bfloat16_support(device: torch.device) -> Optional[str]:
    """What computes bfloat16 natively on ``device`` (e.g. "CPU has AVX-512 BF16"), or None: training's autocast
    and ``serve --dtype auto`` both ask."""
    import torch

    if device.type == "cuda":
        return "GPU computes bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    detectors = {"_is_amx_tile_supported": "CPU has AMX", "_is_avx512_bf16_supported": "CPU has AVX-512 BF16"}
    return next((phrase for name, phrase in detectors.items() if getattr(torch.cpu, name, lambda: False)()), None)


def cpu_description() -> str:
    """The CPU in one phrase for a benchmark's first line, e.g. "AMD EPYC (family 25 model 17), 2 cores, torch kernels
    AVX512, CPU has AVX-512 BF16": machines differ between sessions, and only figures taken on the same CPU compare."""
    import platform

    import torch

    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    native = bfloat16_support(torch.device("cpu")) or "no native bfloat16"
    return f"{name}, {os.cpu_count()} cores, torch kernels {torch.backends.cpu.get_cpu_capability()}, {native}"


def process_memory_bytes() -> int:
    """This process's resident memory now (what the interpreter and the imported libraries take)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next((l for l in status.read_text().splitlines() if l.startswith("VmRSS:")), None)
        if line:
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory a run could still use: free GPU memory on CUDA, else the system's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        line = next((l for l in meminfo.read_text().splitlines() if l.startswith("MemAvailable:")), None)
        if line:
            return int(line.split()[1]) * 1024
    return None
