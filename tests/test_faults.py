"""Faults and data loss: kill -9, SIGTERM, damaged checkpoints, a full disk, --overwrite, NaN, bad resumes.

Every test here would have caught the behaviour described in issue 11 (a deleted folder, a NaN
adapter saved, a traceback on a damaged checkpoint, a resume that rewrote config.yaml first, ...).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import REPO, StartedAt, StopAt

from tunesmith.core.errors import TunesmithError
from tunesmith.pipeline.finetune import finetune
from tunesmith.training.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints
from tunesmith.training.fingerprint import fingerprint_changes, run_fingerprint


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


# --- --overwrite -------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(TunesmithError, match="only replaces a tunesmith run"):
        finetune(tiny_recipe("output.overwrite=true"), progress=False)
    assert (out / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(out)) == ["thesis.tex"]


def test_overwrite_refuses_a_run_holding_a_users_file(tiny_recipe, tmp_path):
    finetune(tiny_recipe("train.max_steps=1"), progress=False)
    (tmp_path / "run" / "notes.md").write_text("mine")
    with pytest.raises(TunesmithError, match=r"would delete files no run writes .*notes\.md"):
        finetune(tiny_recipe("train.max_steps=1", "output.overwrite=true"), progress=False)
    assert (tmp_path / "run" / "notes.md").read_text() == "mine" and (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("where", [".", "..", "home"])
def test_overwrite_never_replaces_the_current_folder_a_parent_or_home(tiny_recipe, tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    (run / "inner").mkdir(parents=True)
    (run / "config.yaml").write_text("a run's marker")  # looks like a run: only the place protects it
    monkeypatch.chdir(run / "inner" if where == ".." else run)
    if where == "home":
        monkeypatch.setenv("HOME", str(run))
        monkeypatch.chdir(tmp_path)
    target = {".": ".", "..": "..", "home": "~"}[where]
    with pytest.raises(TunesmithError, match="refuses to replace"):
        finetune(with_changes(tiny_recipe("output.overwrite=true"), "output", dir=target), progress=False)
    assert (run / "config.yaml").read_text() == "a run's marker" and (run / "inner").is_dir()


def bad_data(folder: Path) -> Path:
    path = folder / "bad.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "broken\n')
    return path


def test_failed_overwrite_leaves_the_old_run_and_a_good_one_replaces_it(tiny_recipe, tmp_path):
    finetune(tiny_recipe("train.max_steps=1"), progress=False)
    out = tmp_path / "run"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A malformed record: found after the model loaded, before the first checkpoint.
    with pytest.raises(TunesmithError, match="line 2: invalid JSON"):
        finetune(tiny_recipe("train.max_steps=1", f"data.train={bad_data(tmp_path)}", "output.overwrite=true"),
                 progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "run"]  # no .tunesmith-old left beside it
    finetune(tiny_recipe("train.max_steps=2", "output.overwrite=true"), progress=False)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "run"]


def test_an_interrupted_overwrite_keeps_the_old_run_aside_until_the_new_one_finishes(tiny_recipe, tmp_path, capfd):
    finetune(tiny_recipe("train.max_steps=1"), progress=False)
    old_summary = (tmp_path / "run" / "summary.json").read_text()
    replacing = tiny_recipe("train.max_steps=4", "train.checkpoint_every=1", "output.overwrite=true")
    with pytest.raises(TunesmithError, match="interrupted"):
        finetune(replacing, extra_hooks=[StopAt(3)], progress=False)
    aside = tmp_path / "run.tunesmith-old"
    assert (aside / "summary.json").read_text() == old_summary
    assert f"kept in {aside} until this one finishes" in capfd.readouterr().err
    with pytest.raises(TunesmithError, match="still holds a run replaced by an earlier --overwrite"):
        finetune(replacing, progress=False)
    started = StartedAt()
    assert finetune(tiny_recipe("train.max_steps=4", "train.checkpoint_every=1"), resume=True, extra_hooks=[started],
                    progress=False)["steps"] == 4
    assert started.step == 2 and not aside.exists()


def test_a_failed_run_leaves_nothing_that_blocks_the_corrected_rerun(tiny_recipe, tmp_path):
    with pytest.raises(TunesmithError, match="line 2: invalid JSON"):
        finetune(tiny_recipe("train.max_steps=1", f"data.train={bad_data(tmp_path)}"), progress=False)
    assert not (tmp_path / "run").exists()
    assert finetune(tiny_recipe("train.max_steps=1"), progress=False)["steps"] == 1  # no "not empty"


def test_read_only_output_folder_is_one_sentence_before_the_model_loads(tiny_recipe, tmp_path, monkeypatch):
    import tunesmith.pipeline.finetune as finetune_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(finetune_module, "load_model_and_tokenizer", must_not_load)
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores file modes: a read-only tmpfs where it can be mounted, else EROFS patched
        mounted = _mount_tmpfs(locked, "ro,size=64k")
        if not mounted:
            import tempfile

            def read_only(*args, **kwargs):
                raise OSError(30, "Read-only file system")

            monkeypatch.setattr(tempfile, "mkstemp", read_only)
    else:
        mounted = False
        locked.chmod(0o555)
    try:
        with pytest.raises(TunesmithError, match=r"cannot write in output folder .*locked.*choose a writable"):
            finetune(tiny_recipe(output="locked/run"), progress=False)
    finally:
        if mounted:
            subprocess.run(["umount", str(locked)], check=True)
        locked.chmod(0o755)


# --- compare --------------------------------------------------------------------------------------------

def test_compare_refuses_an_existing_run_folder_unless_asked(tmp_path, tiny_llama, cli):
    """In this process (``cli``), as the other refusals here: the subject is the sentence, the exit status and
    the user's file, not the process."""
    out = tmp_path / "cmp"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "keep.txt").write_text("a user's file")
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(f"model: {{name: {tiny_llama}}}\ndata: {{train: {REPO}/examples/data/tiny/train.jsonl}}\n"
                      "method: {kind: lora, r: 2}\ntrain: {max_steps: 1, device: cpu}\n")
    completed = cli("compare", str(recipe), "--out", str(out), "--no-progress")
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    assert "already exist" in completed.stderr and "--overwrite" in completed.stderr
    assert (out / "lora" / "keep.txt").read_text() == "a user's file"
    # Asked to overwrite, train still refuses to delete a folder that is not a run.
    completed = cli("compare", str(recipe), "--out", str(out), "--no-progress", "--overwrite")
    assert completed.returncode == 2 and "only replaces a tunesmith run" in completed.stderr, completed.stderr
    assert (out / "lora" / "keep.txt").read_text() == "a user's file"


# --- non-finite loss ------------------------------------------------------------------------------------

def test_inf_in_a_recipe_is_a_schema_error(tiny_recipe):
    with pytest.raises(Exception, match="finite number"):
        tiny_recipe("train.lr=.inf")


def test_nan_loss_stops_with_exit_2_naming_the_step_and_records_and_saves_nothing(tmp_path, tiny_llama, tiny_data,
                                                                                  cli):
    recipe = tmp_path / "nan.yaml"
    out = tmp_path / "run"
    recipe.write_text(f"model: {{name: {tiny_llama}}}\ndata: {{train: {tiny_data}, max_length: 96, template: simple}}\n"
                      "method: {kind: lora, r: 4}\n"
                      "train: {max_steps: 20, batch_size: 4, lr: 1.0e+30, checkpoint_every: 1, device: cpu}\n"
                      f"output: {{dir: {out}}}\n")
    completed = cli("train", str(recipe), "--no-progress")
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    message = completed.stderr
    assert "training stopped at step" in message and "instructions.json, record" in message
    assert "lower train.lr" in message
    step = int(message.split("training stopped at step ")[1].split(":")[0])
    assert step >= 2  # step 1 trains on finite weights; the 1e30 update then overflows
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    kept = list_checkpoints(out / "checkpoints")
    assert kept and kept[-1].name == f"step-{step - 1:08d}" and f"last complete checkpoint is {kept[-1]}" in message
    assert checkpoint_problem(kept[-1]) is None
    weights = load_file(kept[-1] / "trainable.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())  # the good checkpoint is not poisoned


# --- resume ---------------------------------------------------------------------------------------------

def with_changes(recipe, section: str, **changes):
    """``recipe`` with fields of one section replaced."""
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=changes)})


@pytest.fixture(scope="module")
def interrupted_once(tmp_path_factory, tiny_llama, tiny_data):
    """Made once per module: a run stopped (Ctrl-C) at step 5 of 6, checkpoints at steps 2 and 4, and
    the same recipe trained straight through (on a copy of the tiny data, which a test may change)."""
    from tunesmith.config import validate_recipe

    root = tmp_path_factory.mktemp("interrupted")
    shutil.copy(tiny_data, root / "data.json")
    recipe = validate_recipe({
        "model": {"name": tiny_llama},
        "data": {"train": str(root / "data.json"), "max_length": 96, "template": "simple"},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "log_every": 1, "seed": 0, "checkpoint_every": 2,
                  "keep_checkpoints": 2},
        "output": {"dir": str(root / "straight")},
    })
    finetune(recipe, progress=False)
    with pytest.raises(TunesmithError, match="interrupted"):
        finetune(with_changes(recipe, "output", dir=str(root / "run")), extra_hooks=[StopAt(5)], progress=False)
    return recipe, root


@pytest.fixture
def interrupted(interrupted_once, tmp_path):
    """A copy of :func:`interrupted_once` in this test's folder: (recipe of the stopped run, its folder, straight run)."""
    recipe, root = interrupted_once
    for name in ("run", "straight"):
        shutil.copytree(root / name, tmp_path / name)
    shutil.copy(root / "data.json", tmp_path / "data.json")
    recipe = with_changes(recipe, "data", train=(str(tmp_path / "data.json"),))
    return with_changes(recipe, "output", dir=str(tmp_path / "run")), tmp_path / "run", tmp_path / "straight"


def test_resume_below_the_checkpoint_step_is_refused_before_anything_changes(interrupted):
    recipe, out, _ = interrupted
    config = (out / "config.yaml").read_text()
    short = with_changes(recipe, "train", max_steps=3)
    with pytest.raises(TunesmithError, match=r"train.max_steps=3 is below step 4 of checkpoint"):
        finetune(short, resume=True, progress=False)
    assert (out / "config.yaml").read_text() == config  # the recipe that did not run is not recorded


def test_resume_of_a_finished_run_says_so_and_changes_nothing(interrupted):
    recipe, _, straight = interrupted
    summary = (straight / "summary.json").read_text()
    with pytest.raises(TunesmithError, match="has finished"):
        finetune(with_changes(recipe, "output", dir=str(straight)), resume=True, progress=False)
    assert (straight / "summary.json").read_text() == summary


def test_damaged_latest_checkpoint_falls_back_with_a_warning_and_a_torn_metrics_line_is_tolerated(
        interrupted, capfd):
    recipe, out, straight = interrupted
    newest = out / "checkpoints" / "step-00000004"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 3.1')  # the process died while appending
    started = StartedAt()
    finetune(recipe, resume=True, extra_hooks=[started], progress=False)
    assert started.step == 2  # it really resumed from the older checkpoint, not from step 0 or 4
    assert "checkpoint step-00000004 is damaged (trainable.safetensors has" in capfd.readouterr().err
    straight_weights, resumed_weights = adapter_weights(straight), adapter_weights(out)
    assert all(torch.equal(straight_weights[name], resumed_weights[name]) for name in straight_weights)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["truncated training.pt", "missing state.json", "empty folder", "no manifest"])
def test_every_kind_of_damaged_checkpoint_is_skipped(interrupted, damage):
    _, out, _ = interrupted
    newest = out / "checkpoints" / "step-00000004"
    if damage == "truncated training.pt":
        (newest / "training.pt").write_bytes((newest / "training.pt").read_bytes()[:50])
    elif damage == "missing state.json":
        (newest / "state.json").unlink()
    elif damage == "empty folder":
        shutil.rmtree(newest)
        newest.mkdir()
    else:
        (newest / "manifest.json").unlink()
    assert checkpoint_problem(newest) is not None
    warnings = []
    assert latest_checkpoint(out / "checkpoints", warnings.append).name == "step-00000002"
    assert len(warnings) == 1 and "step-00000004 is damaged" in warnings[0]


def test_no_whole_checkpoint_is_one_sentence(interrupted):
    _, out, _ = interrupted
    for checkpoint in list_checkpoints(out / "checkpoints"):
        (checkpoint / "state.json").write_text("{}")
    with pytest.raises(TunesmithError, match=r"no whole checkpoint to resume from .*state.json has 2 bytes"):
        latest_checkpoint(out / "checkpoints")


def test_resume_refuses_a_changed_recipe_or_data_file_naming_the_change(interrupted):
    recipe, out, _ = interrupted
    config = (out / "config.yaml").read_text()
    with pytest.raises(TunesmithError) as caught:
        finetune(with_changes(recipe, "train", lr=5e-4), resume=True, progress=False)
    assert str(caught.value) == (f"the run changed since checkpoint {out / 'checkpoints' / 'step-00000004'} was written "
                                 "(train.lr 0.001 -> 0.0005); resume continues the same run exactly, so undo the "
                                 "change, or continue with the change using --resume --allow-changes")
    # Where and how often a run writes is not part of what it trains on, nor where its data lies: these resume.
    saved = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())["fingerprint"]
    quieter = with_changes(recipe, "train", log_every=3, keep_checkpoints=1)
    data = Path(recipe.data.train[0])
    moved = data.with_name("moved.json")
    shutil.copy(data, moved)
    moved_recipe = with_changes(with_changes(quieter, "output", dir="elsewhere"), "data", train=(str(moved),))
    assert fingerprint_changes(saved, run_fingerprint(moved_recipe)) == []
    data.write_text(data.read_text().replace("Give", "Offer", 1))
    with pytest.raises(TunesmithError, match=r"\(data.train: the data differs from the checkpoint's\)"):
        finetune(recipe, resume=True, progress=False)
    assert (out / "config.yaml").read_text() == config  # refused before anything was rewritten


def test_resume_allow_changes_continues_with_a_warning_and_records_the_new_fingerprint(interrupted, capfd):
    recipe, out, _ = interrupted
    changed = with_changes(recipe, "train", lr=5e-4)
    started = StartedAt()
    finetune(changed, resume=True, allow_changes=True, extra_hooks=[started], progress=False)
    assert started.step == 4 and (out / "summary.json").is_file()
    assert "although the run changed since it was written (train.lr 0.001 -> 0.0005)" in capfd.readouterr().err
    last = list_checkpoints(out / "checkpoints")[-1]
    assert json.loads((last / "state.json").read_text())["fingerprint"] == run_fingerprint(changed)


def test_allow_changes_without_resume_is_refused(tmp_path, cli):
    completed = cli("train", str(tmp_path / "r.yaml"), "--allow-changes")
    assert completed.returncode == 2 and "--allow-changes only applies to --resume" in completed.stderr


KILLED_IN_FIRST_CHECKPOINT = """
import os, signal, sys
import tunesmith.training.checkpoint as checkpoint
from tunesmith.config import load_recipe
from tunesmith.pipeline.finetune import finetune

def killed(obj, handle, *args, **kwargs):  # the first checkpoint is half written when the process dies
    handle.write(b"partial bytes"); handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.torch.save = killed
finetune(load_recipe(sys.argv[1], sys.argv[2:]), progress=False)
"""


def test_a_kill_during_the_first_checkpoint_leaves_a_folder_the_suggested_command_accepts(tmp_path, tiny_llama,
                                                                                          capfd):
    from tunesmith.config import load_recipe

    out = tmp_path / "run"
    recipe = _recipe_file(tmp_path, tiny_llama, out, max_steps=3, every=2)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_FIRST_CHECKPOINT, str(recipe), f"output.dir={out}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "config.yaml").is_file() and not list_checkpoints(out / "checkpoints")
    loaded = load_recipe(str(recipe), [f"output.dir={out}"])
    with pytest.raises(TunesmithError) as caught:
        finetune(loaded, resume=True, progress=False)
    assert "start it again with the same command without --resume" in str(caught.value)
    finetune(loaded, progress=False)  # what that sentence suggests: the same command starts the run again
    assert "holds a run that stopped before its first checkpoint; starting it again" in capfd.readouterr().err
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_full_disk_during_the_first_checkpoint_suggests_a_command_that_works(tiny_recipe, tmp_path, monkeypatch):
    import tunesmith.training.checkpoint as checkpoint_module

    real_save = checkpoint_module.torch.save

    def full(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    recipe = tiny_recipe("train.max_steps=2", "train.checkpoint_every=1")
    with pytest.raises(TunesmithError) as caught:
        finetune(recipe, progress=False)
    assert str(caught.value) == (f"disk full while writing checkpoint 1 in {tmp_path / 'run' / 'checkpoints'}, the "
                                 "run's first; free some space and start the run again with the same command")
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)  # space was freed
    finetune(recipe, progress=False)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_an_interrupted_overwrite_suggests_what_works_for_the_folder_left(tiny_recipe, tmp_path):
    finetune(tiny_recipe("train.max_steps=1"), progress=False)
    out = tmp_path / "run"
    out.rename(tmp_path / "run.tunesmith-old")  # killed -9 right after --overwrite set the old run aside ...
    out.mkdir()
    (out / "config.yaml").write_text("written just before the kill")  # ... and before its first checkpoint
    with pytest.raises(TunesmithError, match="or run the same command without --overwrite to start that run again"):
        finetune(tiny_recipe("train.max_steps=1", "output.overwrite=true"), progress=False)
    finetune(tiny_recipe("train.max_steps=1"), progress=False)
    assert (out / "summary.json").is_file() and not (tmp_path / "run.tunesmith-old").exists()


def test_a_planted_training_pt_does_not_run_code(interrupted, tmp_path):
    import hashlib

    from tunesmith.training.checkpoint import load_checkpoint

    _, out, _ = interrupted
    newest = out / "checkpoints" / "step-00000004"
    witness = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    with (newest / "training.pt").open("wb") as handle:
        pickle.dump({"optimizer": Planted()}, handle)
    manifest = json.loads((newest / "manifest.json").read_text())  # a careful attacker fixes the manifest too
    data = (newest / "training.pt").read_bytes()
    manifest["files"]["training.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TunesmithError, match="refusing to load it"):
        load_checkpoint(newest, torch.device("cpu"))
    assert not witness.exists()


# --- disk full ------------------------------------------------------------------------------------------

def _mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs on ``folder`` (needs root and the right to mount); False where that is not possible."""
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except OSError:  # no mount command
        return False


def test_disk_full_while_checkpointing_keeps_the_last_complete_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, "size=1200k")  # room for the run's files and three checkpoints (about 370 kB each)
    if not mounted:  # where no tmpfs can be mounted: the writer of training.pt fails as a full disk does
        import tunesmith.training.checkpoint as checkpoint_module

        real_save, calls = checkpoint_module.torch.save, []

        def filling_save(obj, handle, *args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                handle.write(b"partial bytes")
                raise OSError(28, "No space left on device")
            return real_save(obj, handle, *args, **kwargs)

        monkeypatch.setattr(checkpoint_module.torch, "save", filling_save)
    try:
        with pytest.raises(TunesmithError, match=r"disk full while writing checkpoint (\d+) .*"
                                                 r"the last complete checkpoint is .*step-\d+") as caught:
            finetune(tiny_recipe("train.max_steps=50", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                                 "data.max_length=64", output="disk/run"), progress=False)
        failed = int(str(caught.value).split("writing checkpoint ")[1].split(" ")[0])
        kept = list_checkpoints(tmp_path / "disk" / "run" / "checkpoints")
        assert kept[-1].name == f"step-{failed - 1:08d}" and checkpoint_problem(kept[-1]) is None
        assert not [p for p in (tmp_path / "disk" / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
        assert not (tmp_path / "disk" / "run" / "adapter").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


# --- SIGTERM and kill -9 ----------------------------------------------------------------------------------

def _recipe_file(tmp_path: Path, model: str, out: Path, max_steps: int, every: int) -> Path:
    recipe = tmp_path / f"recipe-{max_steps}-{every}.yaml"
    recipe.write_text(
        f"model: {{name: {model}}}\n"
        f"data: {{train: {REPO}/examples/data/tiny/train.jsonl, max_length: 48, template: simple}}\n"
        "method: {kind: lora, r: 4, alpha: 8, dropout: 0.1}\n"
        f"train: {{max_steps: {max_steps}, batch_size: 4, lr: 1.0e-3, log_every: 1, seed: 0, "
        f"checkpoint_every: {every}, keep_checkpoints: 2, device: cpu}}\n"
        f"output: {{dir: {tmp_path / 'recipe-default-out'}}}\n")
    return recipe


def _metrics_steps(out: Path) -> int:
    try:
        return sum(1 for _ in (out / "metrics.jsonl").open())
    except FileNotFoundError:
        return 0


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, tiny_llama):
    out = tmp_path / "run"
    recipe = _recipe_file(tmp_path, tiny_llama, out, max_steps=400, every=1000)  # no checkpoint but SIGTERM's
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(recipe), f"output.dir={out}",
                                "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _metrics_steps(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in stderr, stderr
    kept = list_checkpoints(out / "checkpoints")
    assert len(kept) == 1 and checkpoint_problem(kept[0]) is None
    step = int(kept[0].name.removeprefix("step-"))
    assert 3 <= step < 400 and f"last complete checkpoint is {kept[0]}" in stderr
    command = stderr.split("Continue with: ")[1].strip()
    assert command == f"tunesmith train {recipe} output.dir={out} --resume"  # the override travels along


KILL_ROUNDS = 10

ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import peft, transformers  # imported once here, not in every child
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from tunesmith.config import load_recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.pipeline.finetune import finetune

for line in sys.stdin:  # one run per line: {"recipe", "overrides", "resume", "log"}
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1); os.dup2(log, 2)
        code = 0
        try:
            finetune(load_recipe(job["recipe"], job["overrides"]), resume=job["resume"], progress=False)
        except TunesmithError as error:
            print(f"error: {error}", flush=True); code = 2
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


class Zygote:
    """A process that imported torch and tunesmith once and forks one child per run (a child is what we kill).

    Starting ``python -m tunesmith`` costs seconds of imports; forking from a warm process keeps ten
    kill-and-resume rounds inside the time budget, while each child is still a separate process.
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def start(self, recipe: Path, overrides: list[str], resume: bool, log: Path) -> int:
        job = {"recipe": str(recipe), "overrides": overrides, "resume": resume, "log": str(log)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["pid"]

    def wait(self) -> int:
        """The wait status of the last child (a signal number, or the exit code shifted left by 8)."""
        return json.loads(self.process.stdout.readline())["status"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _newest_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].name.removeprefix("step-")) if found else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_the_same_weights(tmp_path, tiny_llama):
    rng = random.Random(11)
    reference, out = tmp_path / "reference", tmp_path / "run"
    recipe = _recipe_file(tmp_path, tiny_llama, out, max_steps=60, every=1)
    zygote = Zygote()
    kills = resumes = during_writes = 0
    try:
        zygote.start(recipe, [f"output.dir={reference}"], False, tmp_path / "reference.log")
        assert zygote.wait() == 0, (tmp_path / "reference.log").read_text()
        for round_number in range(KILL_ROUNDS + 1):
            resume = round_number > 0
            log = tmp_path / f"round-{round_number}.log"
            started_at = _newest_step(out)
            pid = zygote.start(recipe, [f"output.dir={out}"], resume, log)
            if round_number < KILL_ROUNDS:
                during_writes += _kill_at_a_random_moment(pid, out, started_at, rng, aim_at_writes=round_number % 2 == 1)
            status = zygote.wait()
            text = log.read_text()
            assert "Traceback" not in text and "error:" not in text, text
            assert status == (signal.SIGKILL if round_number < KILL_ROUNDS else 0), text
            kills += status == signal.SIGKILL
            resumes += resume and f"resuming from {out / 'checkpoints' / f'step-{started_at:08d}'} (step {started_at} of" in text
    finally:
        zygote.close()
    print(f"kill -9 rounds: {kills}, killed while a checkpoint was being written: {during_writes}, "
          f"resumes that started at the newest checkpoint: {resumes}")
    assert kills == KILL_ROUNDS and resumes == KILL_ROUNDS
    expected, got = adapter_weights(reference), adapter_weights(out)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert json.loads((out / "summary.json").read_text())["steps"] == 60


def _kill_at_a_random_moment(pid: int, out: Path, started_at: int, rng: random.Random, aim_at_writes: bool) -> bool:
    """SIGKILL ``pid`` once it has written a new checkpoint, either after a random delay or (aiming at
    writes) as soon as a checkpoint is being written; True when it was killed during a write."""
    deadline = time.monotonic() + 120
    while _newest_step(out) <= started_at and time.monotonic() < deadline:
        time.sleep(0.005)
    checkpoints = out / "checkpoints"
    until = time.monotonic() + (1.0 if aim_at_writes else rng.uniform(0.0, 0.3))
    in_write = False
    while time.monotonic() < until:
        in_write = any(p.name.endswith(".partial") for p in checkpoints.iterdir())
        if aim_at_writes and in_write:
            break
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    return aim_at_writes and in_write


# --- an adapter on another base model -------------------------------------------------------------------

@pytest.fixture
def adapter_and_bases(tiny_recipe, tmp_path, tiny_llama):
    """A LoRA adapter trained on the tiny model, a same-shaped copy of tiny_llama elsewhere, and a narrower model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    finetune(tiny_recipe("train.max_steps=1", f"model.name={tiny_llama}"), progress=False)
    copy = tmp_path / "copy"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(copy)
    torch.manual_seed(0)
    narrow = tmp_path / "narrow"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(narrow)
    return tmp_path / "run" / "adapter", copy, narrow


def test_an_adapter_names_the_base_it_needs(adapter_and_bases, tiny_llama):
    from tunesmith.inference.generate import load_for_inference

    adapter, copy, narrow = adapter_and_bases
    manifest = json.loads((adapter / "tunesmith.json").read_text())
    assert manifest["base_model"] == str(Path(tiny_llama).resolve())
    assert manifest["base_config"] == {"model_type": "llama", "hidden_size": 64, "vocab_size": 512,
                                       "num_hidden_layers": 5}
    with pytest.raises(TunesmithError, match=r"trained on base model .*tiny_llama\d*, which differs from .*narrow "
                                             r"\(hidden_size 64 there, 32 here, num_hidden_layers 5 there, 2 here\); "
                                             r"load it with --model .*tiny_llama\d*"):
        load_for_inference(str(narrow), str(adapter))
    with pytest.raises(TunesmithError, match=r"trained on base model .*tiny_llama\d*, not .*copy; load it with --model"):
        load_for_inference(str(copy), str(adapter))
    model, _ = load_for_inference(tiny_llama, str(adapter))  # the right base loads
    assert model is not None


def test_an_old_manifest_on_a_narrower_base_is_a_sentence_not_a_traceback(adapter_and_bases):
    from tunesmith.inference.generate import load_for_inference

    adapter, _, narrow = adapter_and_bases
    manifest = json.loads((adapter / "tunesmith.json").read_text())
    del manifest["base_config"]  # written before the shape was recorded
    manifest["base_model"] = "someone/stories260k"
    (adapter / "tunesmith.json").write_text(json.dumps(manifest))
    with pytest.raises(TunesmithError, match=r"does not fit this base model.*load it with --model someone/stories260k"):
        load_for_inference(str(narrow), str(adapter))


# --- one writer per run folder ----------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from tunesmith.training.run_folder import lock_run
lock = lock_run(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_at_once_and_a_killed_holder_releases_the_lock(tmp_path):
    from tunesmith.training.run_folder import lock_path, lock_run, open_run_folder

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "holding-for-the-test"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(TunesmithError) as caught:
            open_run_folder(out, resume=False, overwrite=False)
        assert time.monotonic() - started < 2  # refused at once, not after waiting
        assert str(caught.value) == (f"output folder {out} is being written by another tunesmith process "
                                     f"(pid {holder.pid}: python -c {out} holding-for-the-test); wait for it to finish "
                                     "or choose another output.dir")
        assert not out.exists()  # the refused writer created nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert lock_path(out).exists()  # kill -9 left the file, but the kernel let go of the lock
    folder = open_run_folder(out, resume=False, overwrite=False)
    assert lock_path(out).read_text().startswith(f"pid {os.getpid()}: ")
    folder.release()
    assert not lock_path(out).exists()
    lock_run(out).release()  # and again: released means free


@pytest.mark.slow
def test_train_and_resume_beside_a_running_training_are_refused_without_a_traceback(tmp_path, tiny_llama, cli):
    """The running training is a real process; the refused ones run in this process (``cli``), which to the
    lock is another process all the same, without a fresh import of torch each (5-10 s, far more beside a
    training)."""
    out = tmp_path / "run"
    recipe = _recipe_file(tmp_path, tiny_llama, out, max_steps=100000, every=1)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(recipe), f"output.dir={out}",
                              "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while _newest_step(out) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = cli("train", str(recipe), f"output.dir={out}", *extra)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
            assert (f"output folder {out} is being written by another tunesmith process (pid {first.pid}: "
                    f"tunesmith train {recipe} output.dir={out} --no-progress)") in second.stderr
        assert first.poll() is None  # the first run went on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # The killed run's lock is gone with it: --resume passes the lock and reaches its own checks.
    resumed = cli("train", str(recipe), f"output.dir={out}", "train.max_steps=1", "--resume")
    assert resumed.returncode == 2 and "is below step" in resumed.stderr, resumed.stderr
