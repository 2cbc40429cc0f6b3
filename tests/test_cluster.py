"""Cluster behaviour of `mdt train`, run for real: a requeued `--resume` without a checkpoint
starts from scratch, a resume with another data stream or seed is refused naming the fields,
checkpoint retention and wall-time checkpoints, SIGUSR1 to a running single-process run and to
every process of a torchrun job (as Slurm signals a job) leaves a checkpoint at the current step
and exit status 0, and the resumed run ends with the losses of an uninterrupted run; a stalled
rank makes the others dump their stacks and exit non-zero."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from megatron_domain.checkpoint import saved_steps
from megatron_domain.config import REPO_ROOT, config_from_dict
from megatron_domain.engine import train
from megatron_domain.metrics import read_metrics

from parallel_cases import parity_config_dict

LONG_RUN = 120  # steps: long enough that a signal sent after step 3 arrives mid-run


def cluster_config(corpora: dict, run_dir: Path, steps: int, parallel: dict | None = None, **train_fields) -> dict:
    """The 4-layer parity model without periodic eval, one thread per process (bit-exact
    across processes)."""
    cfg = parity_config_dict(corpora, run_dir, parallel, steps=steps)
    cfg["eval"]["interval"] = 0
    cfg["train"].update({"num_threads": 1, **train_fields})
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def straight(corpora, tmp_path_factory) -> list[float]:
    """The losses of an uninterrupted LONG_RUN-step run (in this process)."""
    return train(config_from_dict(cluster_config(corpora, tmp_path_factory.mktemp("straight") / "run",
                                                 LONG_RUN))).losses


def test_resume_without_a_checkpoint_starts_from_step_0(corpora, tmp_path, capsys):
    """A job preempted before its first checkpoint and requeued with `--resume` trains from
    scratch (saying so) and gets the losses of a plain run."""
    plain = train(config_from_dict(cluster_config(corpora, tmp_path / "plain", 3))).losses
    requeued = train(config_from_dict(cluster_config(corpora, tmp_path / "requeued", 3)), resume=True)
    assert "no complete checkpoint" in capsys.readouterr().out
    assert requeued.losses == plain


def test_resume_with_another_data_stream_or_seed_names_the_fields(corpora, tmp_path):
    cfg = cluster_config(corpora, tmp_path / "run", 4, exit_at_step=2)
    train(config_from_dict(cfg))
    cfg["train"]["exit_at_step"] = 0
    changed = json.loads(json.dumps(cfg))
    changed["data"]["seed"] = 99
    changed["train"]["seed"] = 8
    changed["data"]["corpora"][0]["weight"] = 0.5
    with pytest.raises(ValueError) as err:
        train(config_from_dict(changed), resume=True)
    for field in ("data.seed: 1234", "train.seed: 7", "data.corpora:", "step_0000002"):
        assert field in str(err.value)
    assert len(train(config_from_dict(cfg), resume=True).losses) == 2  # unchanged: continues


def test_keep_last_checkpoints_and_wall_time_checkpoints(corpora, tmp_path, capsys):
    """Every step is due under a tiny wall-time interval; only the newest two survive."""
    cfg = cluster_config(corpora, tmp_path / "run", 5, checkpoint_every_minutes=1e-6, keep_last_checkpoints=2)
    cfg["train"]["progress"] = True
    train(config_from_dict(cfg))
    assert saved_steps(tmp_path / "run") == [4, 5]
    out = capsys.readouterr()
    written = [line for line in (out.out + out.err).splitlines() if "written in" in line]
    assert len(written) == 5 and "deleted step(s) 3" in written[-1]


def wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Poll metrics.jsonl until it has `count` records (the run is mid-way)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if len(read_metrics(run_dir)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {count} steps in {timeout_s} s")


def signal_every_process(root_pid: int, signum: int) -> None:
    """Send `signum` to a process and all its descendants, as Slurm signals every process of
    a job step."""
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def preempted_step(output: str) -> int:
    lines = [line for line in output.splitlines() if "preempted (SIGUSR1) after step" in line]
    assert lines, output[-3000:]
    return int(lines[0].split("after step ")[1].split(":")[0])


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_0_and_resume_equals_straight(corpora, tmp_path, straight):
    run_dir = tmp_path / "run"
    config = write_config(cluster_config(corpora, run_dir, LONG_RUN), tmp_path / "run.yaml")
    command = [sys.executable, "-m", "megatron_domain.cli", "train", str(config), "--no-progress"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    step = preempted_step(output)
    assert 3 <= step < LONG_RUN and saved_steps(run_dir) == [step]
    resumed = subprocess.run(command + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(run_dir)] == straight


@pytest.mark.slow
def test_sigusr1_to_a_torchrun_job_checkpoints_every_rank_and_resume_equals_straight(corpora, tmp_path):
    """launch/torchrun.sh with 2 processes (dp_shard=2): SIGUSR1 reaches torchrun (which ignores
    it) and only the rank-1 worker; the ranks agree and both stop after the same step, the job
    exits 0, and the relaunched `--resume` job ends with the losses of an uninterrupted
    2-process job. (The Slurm test in test_launch.py signals every process.)"""
    from parallel_harness import free_port

    steps = 40

    def launch(name: str, *extra: str, wait: bool = True):
        config = write_config(cluster_config(corpora, tmp_path / name, steps, {"dp_shard": 2}), tmp_path / f"{name}.yaml")
        env = {**os.environ, "NPROC": "2", "LOG_DIR": str(tmp_path / "logs" / name), "MASTER_PORT": str(free_port())}
        command = ["bash", "launch/torchrun.sh", str(config), "--no-progress", *extra]
        if wait:
            done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            return done
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    launch("straight")
    proc = launch("run", wait=False)
    wait_for_steps(tmp_path / "run", 3, proc)
    launcher = psutil.Process(proc.pid)
    rank1 = next(w for w in launcher.children() if w.environ().get("RANK") == "1")
    for target in (launcher, rank1):
        target.send_signal(signal.SIGUSR1)
    try:
        output = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:  # the ranks did not agree: one waits for the other forever
        signal_every_process(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-3000:]
    step = preempted_step(output)
    assert 3 <= step < steps and saved_steps(tmp_path / "run") == [step]
    launch("run", "--resume")
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [r["loss"] for r in read_metrics(tmp_path / "straight")]


@pytest.mark.slow
def test_a_stalled_rank_makes_the_job_dump_stacks_and_exit_nonzero(corpora, tmp_path):
    """Rank 1 of a 2-process job is stopped (SIGSTOP) mid-run: rank 0 waits in a collective
    until train.hang_timeout_s, then faulthandler writes its stack and the process exits 1, so
    torchrun fails the job."""
    from parallel_harness import free_port

    run_dir = tmp_path / "run"
    config = write_config(cluster_config(corpora, run_dir, 10_000, {"dp_shard": 2}, hang_timeout_s=8),
                          tmp_path / "hang.yaml")
    logs = tmp_path / "logs"
    env = {**os.environ, "NPROC": "2", "LOG_DIR": str(logs), "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", str(config), "--no-progress"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(run_dir, 3, proc)
    workers = psutil.Process(proc.pid).children()
    stalled = next(w for w in workers if w.environ().get("RANK") == "1")
    waiting = next(w for w in workers if w.environ().get("RANK") == "0")
    stalled.suspend()
    try:
        waiting.wait(timeout=60)
    finally:
        stalled.kill()  # as the scheduler does once the job fails (torchrun would wait 30 s for it)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-3000:]
    assert re.search(r"exitcode\s*:\s*1 ", output), output[-3000:]  # torchrun's summary: faulthandler's exit(1)
    rank0_err = next(logs.rglob("0/stderr.log")).read_text()
    assert "Timeout (0:00:08)!" in rank0_err and "engine.py" in rank0_err, rank0_err[-3000:]


def two_stage_pipeline(corpora: dict, out: Path) -> dict:
    """pretrain -> a second pretrain stage from the first one's checkpoint (checkpoints every 2
    steps), evaluated on the alpha held-out set."""
    defaults = parity_config_dict(corpora, out / "unused", steps=6)
    defaults.pop("mode")
    defaults["train"].pop("run_dir")
    defaults["train"]["num_threads"] = 1
    defaults["eval"]["interval"] = 0
    return {"out_dir": str(out), "defaults": defaults,
            "stages": [{"name": "first", "mode": "pretrain"},
                       {"name": "second", "mode": "pretrain", "model": {"init_from": "{out_dir}/first"},
                        "train": {"steps": 24, "checkpoint_every": 2}}]}


@pytest.mark.slow
def test_pipeline_resume_after_a_kill_in_the_second_stage(corpora, tmp_path):
    """Killed (SIGKILL) in its second stage, `mdt pipeline --resume` skips the first stage
    (untouched), continues the second from its last checkpoint and ends with the report and
    losses of an uninterrupted pipeline; a changed setting of the second stage reruns it."""
    def command(out: Path, *extra: str) -> list[str]:
        config = write_config(two_stage_pipeline(corpora, out), out.with_suffix(".yaml"))
        return [sys.executable, "-m", "megatron_domain.cli", "pipeline", str(config), "--no-progress", *extra]

    straight = tmp_path / "straight"
    done = subprocess.run(command(straight), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(out / "second", 5, proc)
    proc.kill()
    proc.wait()
    first_record = (out / "first" / "stage.json").stat().st_mtime_ns
    resumed = subprocess.run(command(out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[first] --resume: skip (complete, config unchanged)" in resumed.stdout
    assert "[second] --resume: resume (interrupted; continuing from step_00000" in resumed.stdout
    assert (out / "first" / "stage.json").stat().st_mtime_ns == first_record
    assert [r["loss"] for r in read_metrics(out / "second")] == [r["loss"] for r in read_metrics(straight / "second")]
    report, want = (json.loads((d / "report.json").read_text()) for d in (out, straight))
    assert [s["eval_after"]["ppl"] for s in report["stages"]] == [s["eval_after"]["ppl"] for s in want["stages"]]

    changed = subprocess.run(command(out, "--resume", "--set", "stages.second.optim.lr=1e-3"), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "[first] --resume: skip" in changed.stdout
    assert "[second] --resume: rerun (its config changed: optim.lr)" in changed.stdout
    assert list(tmp_path.glob("killed/second.old-*"))  # the earlier run moved aside, not deleted


def test_resume_counts_a_field_added_since_the_run_at_its_default(corpora, tmp_path):
    """A stage's stored config written before a field existed (the key absent) compares equal
    to today's config when today's value is that field's default: --resume skips the stage
    rather than rerunning the pipeline from its first stage; a non-default value is a change."""
    from megatron_domain.pipeline import STAGE_CONFIG, STAGE_RECORD, comparable_config, stage_action

    cfg_dict = parity_config_dict(corpora, tmp_path / "stage", steps=2)
    cfg = config_from_dict(cfg_dict)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True)
    older = comparable_config(cfg)
    del older["dpo"]["gold_field"], older["rs_sft"]["replay_fraction"]  # fields a later version added
    (run_dir / STAGE_CONFIG).write_text(json.dumps(older))
    (run_dir / STAGE_RECORD).write_text("{}")
    assert stage_action(cfg, resume=True, earlier_rerun="") == ("skip", "complete, config unchanged")
    changed = config_from_dict({**cfg_dict, "rs_sft": {"replay": "chat.jsonl", "replay_fraction": 0.5}})
    action, why = stage_action(changed, resume=True, earlier_rerun="")
    assert action == "rerun" and why == "its config changed: rs_sft.replay, rs_sft.replay_fraction"
