"""The launchers run for real on CPU: `launch/torchrun.sh` starts 2 gloo processes through
torchrun, and `launch/slurm.sbatch` runs under stand-in `srun`/`scontrol` commands (one
"node" = this machine) with torchrun's c10d rendezvous. Both train the parity model at tp=2
and must reproduce the single-process losses."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_domain.config import REPO_ROOT, config_from_dict
from megatron_domain.engine import train

from parallel_cases import parity_config_dict


@pytest.fixture(scope="module")
def reference_losses(corpora, tmp_path_factory) -> list[float]:
    """3 steps of the parity model in this process."""
    return train(config_from_dict(parity_config_dict(corpora, tmp_path_factory.mktemp("ref") / "run"))).losses


def _write_config(corpora: dict, tmp_path: Path) -> Path:
    path = tmp_path / "tp2.yaml"
    path.write_text(yaml.safe_dump(parity_config_dict(corpora, tmp_path / "run", {"tp": 2})))
    return path


def _final_loss(stdout: str) -> float:
    # torchrun prefixes rank 0's console lines with "[default0]:"
    results = [json.loads(line[line.index('{"run_dir"'):]) for line in stdout.splitlines() if '{"run_dir"' in line]
    assert results, stdout
    return results[-1]["final_loss"]


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "LOG_DIR": str(tmp_path / "logs"), "MASTER_PORT": str(_port()), **extra}


def _port() -> int:
    from parallel_harness import free_port
    return free_port()


@pytest.mark.slow
def test_torchrun_launcher_two_processes(corpora, tmp_path, reference_losses):
    config = _write_config(corpora, tmp_path)
    proc = subprocess.run(["bash", "launch/torchrun.sh", str(config), "--no-progress"], cwd=REPO_ROOT,
                          env=_env(tmp_path, NPROC="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert abs(_final_loss(proc.stdout) - reference_losses[-1]) <= 1e-5
    assert any((tmp_path / "logs").rglob("stdout.log"))  # per-rank logs were written


@pytest.mark.slow
def test_slurm_script_with_stand_in_srun(corpora, tmp_path, reference_losses):
    """`srun` runs its command once (one node); `scontrol show hostnames` names localhost."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
        "scontrol": '#!/bin/bash\necho 127.0.0.1\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    config = _write_config(corpora, tmp_path)
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="1", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node001", GPUS_PER_NODE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "launch/slurm.sbatch", str(config), "--no-progress"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rendezvous 127.0.0.1:" in proc.stdout
    assert abs(_final_loss(proc.stdout) - reference_losses[-1]) <= 1e-5


def test_launchers_reject_a_missing_config(tmp_path):
    for script in ("launch/torchrun.sh", "launch/slurm.sbatch"):
        proc = subprocess.run(["bash", script, str(tmp_path / "nope.yaml")], cwd=REPO_ROOT, capture_output=True,
                              text=True, env={**os.environ, "SLURM_NNODES": "1"}, timeout=60)
        assert proc.returncode == 2 and "nope.yaml does not exist" in proc.stderr


@pytest.mark.slow
def test_slurm_script_passes_the_time_limit_signal_on_and_requeues(corpora, tmp_path):
    """SIGUSR1 to the batch shell (Slurm's --signal=B:USR1@300): the script signals every job
    process (stand-in scancel), the 2 workers checkpoint at the same step and exit 0, the
    script requeues the job (stand-in scontrol), and the requeued job's identical command line
    (--resume) finishes the run."""
    import signal
    import sys
    import time

    from megatron_domain.checkpoint import saved_steps
    from megatron_domain.metrics import read_metrics

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n',
        "scontrol": f'#!/bin/bash\nif [[ $1 == requeue ]]; then echo "$@" >> {tmp_path}/requeued; '
                    'else echo 127.0.0.1; fi\n',
        # every process of the job (the batch shell's descendants), as `scancel --signal` reaches them
        "scancel": f"#!{sys.executable}\nimport os, signal, psutil\n"
                   "for p in psutil.Process(os.getppid()).children(recursive=True):\n"
                   "    if p.pid != os.getpid():\n        p.send_signal(signal.SIGUSR1)\n",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    steps, run_dir = 40, tmp_path / "run"
    config = tmp_path / "dp2.yaml"
    cfg = parity_config_dict(corpora, run_dir, {"dp_shard": 2}, steps=steps)
    cfg["eval"]["interval"] = 0
    config.write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="1", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node001", GPUS_PER_NODE="2", OMP_NUM_THREADS="1")
    command = ["bash", "launch/slurm.sbatch", str(config), "--no-progress"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while len(read_metrics(run_dir)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "requeueing job 4242" in output and (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    step = saved_steps(run_dir)[-1]
    assert 3 <= step < steps and f"preempted (SIGUSR1) after step {step}" in output
    requeued = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
