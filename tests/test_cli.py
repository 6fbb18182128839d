"""The command line as a user meets it: output folders that are never clobbered, numbers refused at
parse time, one line (no traceback) for a read-only folder, help on every option, a clean `build`.

References are independent of the code: the file system itself (what is left on disk, what another
process can lock), the operating system's own refusal of a write by a process that file modes bind, the
count of U-Net calls a sampling loop really makes.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hollow_export import store
from hollow_export.cli import main
from hollow_export.errors import HollowError

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


# ---- output folders (store.atomic_dir) -------------------------------------------------------------

def _write(path: Path, command: str, overwrite: bool = False, files=("a.bin",)):
    with store.atomic_dir(path, command, overwrite) as tmp:
        for name in files:
            (tmp / name).write_text(name)


def test_foreign_folder_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.jpg").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(HollowError, match="not empty and is not an earlier `merge` output"):
            _write(out, "merge", overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["photo.jpg"]
    assert (out / "photo.jpg").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no work folder left behind


def test_own_output_needs_overwrite_and_nothing_foreign_is_deleted(tmp_path):
    out = tmp_path / "out"
    _write(out, "build", files=("a.bin", "b.bin"))
    with pytest.raises(HollowError, match="pass --overwrite"):
        _write(out, "build", files=("c.bin",))
    with pytest.raises(HollowError, match="not an earlier `merge` output"):  # another command's output
        _write(out, "merge", overwrite=True)
    _write(out, "build", overwrite=True, files=("c.bin",))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["c.bin"]
    (out / "buffer.bin").write_text("user data")  # a user's file put into the output later
    with pytest.raises(HollowError, match="did not write \\(buffer.bin\\)"):
        _write(out, "build", overwrite=True)
    assert (out / "buffer.bin").read_text() == "user data" and (out / "c.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_folder_and_a_file_at_out(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "build")
    assert (tmp_path / "empty" / "a.bin").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(HollowError, match="is a file"):
        _write(tmp_path / "file", "build")
    assert (tmp_path / "file").read_text() == "x"


def test_output_inside_or_around_an_input_is_refused(tmp_path):
    bundle = tmp_path / "runs" / "bundle"
    bundle.mkdir(parents=True)
    for out in (bundle, bundle / "merged", tmp_path / "runs"):
        with pytest.raises(HollowError, match="overlaps --bundle"):
            store.check_apart(out, {"--bundle": bundle})
    store.check_apart(tmp_path / "runs" / "merged", {"--bundle": bundle, "--model": None})


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hollow_export import store
    with store.atomic_dir(Path(sys.argv[1]), sys.argv[2]) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(600)
""")


def _start_writer(out: Path, command: str):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), command], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    work = Path(proc.stdout.readline().strip())
    assert work.is_dir() and (work / "half.bin").exists()
    return proc, work


def test_work_folder_of_a_killed_run_is_removed_and_a_live_one_kept(tmp_path):
    out = tmp_path / "bundle"
    killed, stale = _start_writer(out, "build")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert stale.is_dir()  # a kill leaves the hidden work folder behind
    live, in_use = _start_writer(out, "build")
    other_cmd, other = _start_writer(out, "merge")  # same name, another command
    other_cmd.send_signal(signal.SIGKILL)
    other_cmd.wait()
    unmarked = tmp_path / ".bundle.abcd1234.tmp"  # looks like ours, but no lock file: not provably ours
    unmarked.mkdir()
    try:
        _write(out, "build")
        assert not stale.exists() and not stale.with_name(stale.name + store.WORK_LOCK).exists()
        assert in_use.is_dir()  # its writer still holds the lock
        assert other.is_dir() and unmarked.is_dir()
        assert (out / "a.bin").exists()
    finally:
        live.kill()
        live.wait()


SWAP_KILLED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from hollow_export import store
    renames, stop_after = [], int(sys.argv[2])
    real_replace = os.replace
    def replace(src, dst):  # the kill lands right after rename number `stop_after` of the swap
        real_replace(src, dst)
        renames.append(dst)
        if len(renames) == stop_after:
            print("renamed", flush=True)
            time.sleep(600)
    os.replace = replace
    with store.atomic_dir(Path(sys.argv[1]), "build", overwrite=True) as tmp:
        (tmp / "a.bin").write_text("second")
""")


@pytest.mark.parametrize("renames_done", [1, 2])
def test_a_kill_inside_the_replace_is_settled_by_the_next_run(tmp_path, renames_done):
    out = tmp_path / "bundle"
    _write(out, "build")  # the earlier output: a.bin (and b.bin)
    earlier = sorted(p.name for p in out.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", SWAP_KILLED, str(out), str(renames_done)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "renamed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    aside = list(tmp_path.glob(".bundle.*.old"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == earlier
    if renames_done == 1:  # killed between the renames: no output at all until the next run puts it back
        assert not out.exists()
        with pytest.raises(HollowError, match="holds an earlier `build` output"):
            store.check_output_dir(out, "build")
        assert sorted(p.name for p in out.iterdir()) == earlier and (out / "a.bin").read_text() != "second"
    else:  # the new output is in place; only the aside copy is left over
        assert (out / "a.bin").read_text() == "second"
        store.check_output_dir(out, "build", overwrite=True)
        assert (out / "a.bin").read_text() == "second"
    assert not list(tmp_path.glob(".bundle.*.old"))


SAVE = textwrap.dedent("""
    import sys, torch
    from hollow_export import store
    store.save_tensors(sys.argv[1], {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)},
                       metadata={k: k * 3 for k in "zyxwvutsrq"})
""")


def test_safetensors_are_the_same_bytes_from_two_processes(tmp_path):
    from safetensors import safe_open
    for name in ("one", "two"):  # separate processes: the writer's hash-map order differs between them
        subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / name)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    with safe_open(str(tmp_path / "one"), "pt") as f:  # still a valid file, to the stock reader
        assert f.metadata() == {k: k * 3 for k in "zyxwvutsrq"}
        assert f.get_tensor("b").tolist() == [[0, 1, 2], [3, 4, 5]] and f.get_tensor("a").tolist() == [1] * 4


# ---- numbers refused at parse time (exit 2), everything else exit 1 with one line -----------------

BAD_VALUES = [
    ("device train --bundle b --steps 0", "--steps"),
    ("device train --bundle b --steps -5", "--steps"),
    ("device train --bundle b --checkpoint-every 0", "--checkpoint-every"),
    ("device train --bundle b --checkpoint-every -3", "--checkpoint-every"),
    ("device train --bundle b --max-minutes -1", "--max-minutes"),
    ("device train --bundle b --lr 0", "--lr"),
    ("device train --bundle b --lr -1e-4", "--lr"),
    ("device train --bundle b --lr nan", "--lr"),
    ("device train --bundle b --lr inf", "--lr"),
    ("device collect --bundle b --images i --samples 0", "--samples"),
    ("device collect --bundle b --images i --seed -1", "--seed"),
    ("generate --lora x --prompt p --steps 0", "--steps"),
    ("generate --lora x --prompt p --steps -3", "--steps"),
    ("generate --lora x --prompt p --guidance nan", "--guidance"),
    ("build --steps 0", "--steps"),
    ("build --samples 0", "--samples"),
    ("build --lr nan", "--lr"),
    ("build --beta1 1", "--beta1"),
    ("build --eps 0", "--eps"),
    ("build --weight-decay -0.1", "--weight-decay"),
    ("build --rank 0", "--rank"),
    ("build --alpha -inf", "--alpha"),
    ("build --fraction 1.5", "--fraction"),
    ("build --fraction nan", "--fraction"),
    ("build --depth -1", "--depth"),
    ("build --resolution 0", "--resolution"),
    ("plan --rank -4", "--rank"),
    ("personalize --images i --instance-prompt a --class-prompt b --batch-size 0", "--batch-size"),
    ("demo-photos --count 0", "--count"),
    ("bench memory --steps 1", "--steps"),
    ("bench memory --threads 0", "--threads"),
    ("bench sweep --lr 0", "--lr"),
    ("bench ort --timeout 0", "--timeout"),
    ("profile --bundle b --timeout -5", "--timeout"),
]


@pytest.mark.parametrize("args,option", BAD_VALUES)
def test_bad_numbers_are_refused_before_any_work(args, option):
    result = CliRunner().invoke(main, args.split())
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert "Traceback" not in result.output


def test_paths_of_the_wrong_kind_are_refused_at_parse_time(tmp_path):
    (tmp_path / "file").write_text("x")
    for args in (f"device train --bundle b --run {tmp_path / 'file'}",
                 f"device collect --bundle b --images i --buffer {tmp_path}",
                 f"generate --lora x --prompt p --out {tmp_path}"):
        result = CliRunner().invoke(main, args.split())
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_model_options_are_refused_with_the_ort_engine():
    result = CliRunner().invoke(main, "generate --lora x --prompt p --engine ort --arch tiny".split())
    assert result.exit_code == 2 and "with --engine ort" in result.output


def test_generate_refuses_to_clobber_an_image_or_write_into_its_lora_folder(tmp_path):
    lora_dir = tmp_path / "merged"
    lora_dir.mkdir()
    (tmp_path / "image.png").write_bytes(b"my picture")
    cases = [(["--out", str(tmp_path / "image.png")], "already exists; pass --overwrite"),
             (["--out", str(lora_dir / "image.png")], "overlaps --lora"),
             (["--out", str(tmp_path / "image.png"), "--prompt", "q"], None)]  # two prompts: _0, _1, _sheet
    for extra, message in cases[:2]:
        result = CliRunner().invoke(main, ["generate", "--lora", str(lora_dir), "--prompt", "p", *extra])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    (tmp_path / "image_sheet.png").mkdir()  # a folder where the contact sheet would go
    result = CliRunner().invoke(main, ["generate", "--lora", str(lora_dir), "--prompt", "p", *cases[2][0]])
    assert result.exit_code == 1 and "image_sheet.png is a folder" in result.output
    assert (tmp_path / "image.png").read_bytes() == b"my picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "image_sheet.png", "merged"]


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield " ".join(path + (name,)), cmd


def test_every_option_has_help_and_every_number_a_range():
    missing, unbounded = [], []
    for name, cmd in _commands(main):
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"{name} {param.opts[0]}")
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)) and not isinstance(
                    param.type, click.types._NumberRangeBase):
                unbounded.append(f"{name} {param.opts[0]}")
    assert not missing and not unbounded, (missing, unbounded)


# ---- a really read-only folder: the operating system refuses, the tool says one line --------------

def _as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _without_file_override():
    """Root minus the capabilities that let it ignore file modes (dropped from the bounding set,
    so the exec'd process never gets them): a folder mode 0555 owned by root refuses its writes."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _drop_for_this_machine():
    """How to run a process that file modes bind: as it is (not root), as `nobody` (when the
    interpreter and the repo are readable by it), else as root without the override capabilities.
    None when neither works (then the tests skip, saying why)."""
    if os.geteuid() != 0:
        return lambda: None
    reasons = []
    for drop in (_as_nobody, _without_file_override):
        try:
            probe = subprocess.run([sys.executable, "-c", "import hollow_export.cli"], preexec_fn=drop,
                                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as err:
            reasons.append(f"{drop.__name__}: {err}")
            continue
        if probe.returncode == 0:
            return drop
        reasons.append(f"{drop.__name__}: {probe.stderr.strip()[-200:]}")
    return "; ".join(reasons)


def _run(args, cwd, env=None, drop=None):
    """The CLI in a fresh process (with `drop` run in the child before exec)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "hollow_export.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, preexec_fn=drop, timeout=600)


@pytest.fixture(scope="module")
def readonly(tmp_path_factory, small_bundle, photo_dir):
    """A world-readable workspace holding a bundle, photos, a buffer and a read-only folder `ro`;
    yields (workspace, how to drop privileges)."""
    drop = _drop_for_this_machine()
    if isinstance(drop, str):
        pytest.skip(f"cannot run a process that file modes bind here: {drop}")
    base = Path(tempfile.mkdtemp(prefix="hollow-ro-"))
    shutil.copytree(small_bundle, base / "bundle")
    shutil.copytree(photo_dir, base / "photos")
    home = base / "home"
    home.mkdir()
    from hollow_export.device.collect import collect
    collect(base / "bundle", base / "photos", base / "buffer.bin", samples=2, progress=False)
    from hollow_export.device.train import TrainConfig, train
    train(base / "bundle", base / "buffer.bin", base / "run", TrainConfig(steps=1, progress=False))  # for export
    ro = base / "ro"
    ro.mkdir()
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    ro.chmod(0o555)
    home.chmod(0o777)
    # the fault is real: the process the tests start cannot write there
    denied = subprocess.run([sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"], preexec_fn=drop,
                            capture_output=True, text=True)
    assert denied.returncode and "PermissionError" in denied.stderr
    yield base, drop
    shutil.rmtree(base, ignore_errors=True)


WRITING_COMMANDS = {
    "build": "build --out ro/bundle",
    "merge": "merge --bundle bundle --lora lora/lora.safetensors --out ro/merged",
    "generate": "generate --lora merged --prompt p --out ro/image.png",
    "personalize": "personalize --images photos --instance-prompt a --class-prompt b --out ro/run",
    "demo-photos": "demo-photos --out ro/photos",
    "device collect": "device collect --bundle bundle --images photos --samples 2 --buffer ro/buffer.bin",
    "device train": "device train --bundle bundle --buffer buffer.bin --run ro/run --steps 1",
    "device export": "device export --bundle bundle --checkpoint run --out ro/lora",
}


@pytest.mark.parametrize("name", list(WRITING_COMMANDS))
def test_read_only_folder_is_one_line_and_exit_1(readonly, name):
    readonly, drop = readonly
    result = _run(WRITING_COMMANDS[name].split(), readonly, drop=drop,
                  env={"HOME": str(readonly / "home"), "MPLCONFIGDIR": str(readonly / "home")})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("Error: "), result.stderr[-2000:]
    assert re.search(r"\bro\b", lines[-1]) and "Permission denied" in lines[-1], lines[-1]
    assert os.listdir(readonly / "ro") == []


@pytest.mark.parametrize("writer", ["write_json", "save_tensors", "atomic_dir"])
def test_store_writers_name_the_path_under_a_real_refusal(readonly, writer):
    readonly, drop = readonly
    code = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from hollow_export import store
        target = Path({str(readonly / 'ro' / 'out')!r})
        try:
            if {writer!r} == "write_json":
                store.write_json(target, {{"a": 1}})
            elif {writer!r} == "save_tensors":
                store.save_tensors(target, {{"a": torch.zeros(2)}})
            else:
                with store.atomic_dir(target, "build") as tmp:
                    (tmp / "x").write_text("x")
        except store.StoreError as err:
            print(err)
            sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=drop, capture_output=True, text=True, cwd=readonly)
    assert result.returncode == 3, result.stderr[-2000:]
    assert str(readonly / "ro") in result.stdout and "Permission denied" in result.stdout


def test_plan_prints_a_tiny_buffer_in_readable_units():
    result = CliRunner().invoke(main, ["plan", "--arch", "tiny"])
    line = next(l for l in result.output.splitlines() if l.startswith("buffer per sample"))
    shape = [int(n) for n in line.split()[3].split("x")]  # e.g. 64x4x4
    nbytes = 4 * shape[0] * shape[1] * shape[2]  # fp32, by hand
    assert nbytes < 1e6 and line.endswith(f"= {nbytes / 1000:.3g} kB"), line


# ---- honest progress, quiet libraries, a clean build ----------------------------------------------

def test_progress_bar_counts_the_unet_calls_pndm_really_makes(tiny_pipe, capsys):
    import torch
    from hollow_export.inference.generate import denoise

    calls = []

    def eps(x, t):
        calls.append(int(t))
        return torch.zeros_like(x)
    scheduler = tiny_pipe.scheduler.__class__.from_config(tiny_pipe.scheduler.config)
    denoise(eps, eps, scheduler, torch.zeros(1, 4, 8, 8), 25, 7.5, "test")
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    evaluations = len(calls) // 2  # conditional and unconditional per evaluation
    assert type(scheduler).__name__ == "PNDMScheduler" and evaluations == 26  # PLMS repeats its first step
    assert f"{evaluations}/{evaluations}" in bar and "25 steps" in bar and "U-Net eval" in bar


def test_cli_build_is_quiet_replaces_only_with_overwrite_and_cleans_killed_runs(tmp_path):
    out = tmp_path / "bundle"
    stale = tmp_path / ".bundle.k1ll3d.tmp"  # what a killed build leaves: work folder + free lock naming it
    stale.mkdir()
    (stale / "precompute.onnx").write_bytes(b"half")
    stale.with_name(stale.name + store.WORK_LOCK).write_text("build")
    args = ["build", "--rank", "4", "--out", str(out)]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    noise = [line for line in first.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("build:", "Loading pipeline components"))]
    assert noise == [], noise[:5]
    assert not stale.exists()
    from hollow_export.bundle import Bundle
    first_id = Bundle.from_pretrained(out).id  # verifies every file against the manifest
    again = _run(args, tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr.strip().splitlines()[-1]
    assert Bundle.from_pretrained(out).id == first_id
    (out / "notes.txt").write_text("mine")
    forced = _run(args + ["--overwrite"], tmp_path)
    assert forced.returncode == 1 and "notes.txt" in forced.stderr
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    forced = _run(args + ["--overwrite"], tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    Bundle.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
