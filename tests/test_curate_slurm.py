"""`mdt data curate --executor slurm` without a Slurm cluster: `sbatch` and `srun` on PATH are
(and `scontrol`, which datatrove asks for the node list) stand-ins that run each submitted job at once, every array index in turn, with the
environment Slurm gives a task (SLURM_ARRAY_TASK_ID, SLURM_NODELIST, RUN_OFFSET). Submission
order is dependency order (datatrove submits a job's dependency first), so the jobs run in the
order a cluster would run them. What runs is datatrove's real launch scripts and pickled
executors: the corpus and report must equal the local executor's, the phases must be chained
by `afterok` dependencies, and the config's partition and environment command must reach the
scripts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

ROOT = Path(__file__).resolve().parents[1]

FAKE_SBATCH = r'''#!{python}
"""Runs a batch script now: each index of its --array in turn; records the submission."""
import json, os, re, subprocess, sys
args, script = sys.argv[1:-1], sys.argv[-1]
text = open(script).read()
log = os.environ["FAKE_SLURM_LOG"]
job_id = sum(1 for _ in open(log)) + 1 if os.path.exists(log) else 1
directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", text, re.M))
dependency = next((a.split("=", 1)[1] for a in args if a.startswith("--dependency=")), directives.get("dependency", ""))
with open(log, "a") as f:
    f.write(json.dumps({{"job": job_id, "name": directives.get("job-name"), "partition": directives.get("partition"),
                        "dependency": dependency, "array": directives.get("array", ""), "script": text}}) + "\n")
env = dict(os.environ, SLURM_JOB_ID=str(job_id), SLURM_NODELIST="localhost", SLURM_NODEID="0")
for arg in args:  # --export=ALL,RUN_OFFSET=0
    if arg.startswith("--export="):
        env.update(kv.split("=", 1) for kv in arg.split("=", 1)[1].split(",")[1:])
array = directives.get("array", "")
indices = range(int(array.split("-")[0]), int(array.split("-")[1].split("%")[0]) + 1) if array else [None]
for index in indices:
    task_env = dict(env, **({{"SLURM_ARRAY_TASK_ID": str(index)}} if index is not None else {{}}))
    subprocess.run(["bash", script], env=task_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job_id}}")
'''

FAKE_SRUN = '#!/usr/bin/env bash\n# srun [options] COMMAND ARG: run the command here\nexec "${@: -2}"\n'
FAKE_SCONTROL = '#!/usr/bin/env bash\n# scontrol show hostnames NODELIST: one node\necho "$4"\n'


def write_inputs(folder: Path) -> None:
    import random

    words = ("the of and to in is that for it as with printer driver firmware update network cable power supply "
             "paper tray toner cartridge error code reset").split()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(120)) + "." for _ in range(10)]
    docs += [docs[2], "Mail jane.doe@example.com about it. " + docs[5][:400], "buy now " * 50]
    folder.mkdir(parents=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def curate(tmp: Path, name: str, env: dict | None = None, *extra: str) -> subprocess.CompletedProcess:
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({"inputs": [str(tmp / "raw")], "output_dir": str(tmp / name), "workers": 2,
                                  "quality": {"min_words": 20}, "near_dedup": {"bands": 4, "rows": 8},
                                  "slurm": {"partition": "cpu-small", "env_command": "export CURATE_ENV=ok"}}))
    return subprocess.run([sys.executable, "-m", "megatron_domain.cli", "data", "curate", str(config), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def corpus(out: Path) -> list[tuple[str, str]]:
    return sorted((d["id"], d["text"]) for p in (out / "jsonl").glob("*.jsonl")
                  for d in map(json.loads, p.read_text().splitlines()))


@pytest.mark.slow
def test_slurm_executor_chains_the_phases_and_matches_local(tmp_path):
    write_inputs(tmp_path / "raw")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in ("sbatch", "srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    local = curate(tmp_path, "local")
    assert local.returncode == 0, local.stderr[-3000:]
    log = tmp_path / "slurm_jobs.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_LOG=str(log))
    run = curate(tmp_path, "slurm", env, "--executor", "slurm")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    submitted = json.loads(run.stdout.strip().splitlines()[-1])["submitted"]
    names = [s["phase"] for s in submitted]
    assert names == ["read", "exact_signatures", "exact_find", "exact_filter", "near_signatures", "near_buckets",
                     "near_clusters", "near_filter", "redact_filter", "finish"]
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    phases = [j for j in jobs if j["name"].startswith("curate_") and "merge_stats" not in j["script"]]
    assert [j["name"] for j in phases] == [f"curate_{n}" for n in names]
    for before, after in zip(phases, phases[1:]):  # each phase waits for the one before
        assert after["dependency"] == f"afterok:{before['job']}"
    assert phases[0]["dependency"] == "" and all(j["partition"] == "cpu-small" for j in phases)
    assert all("export CURATE_ENV=ok" in j["script"] for j in phases)
    assert re.search(r"--array=0-1\b", phases[0]["script"]) and re.search(r"--array=0-0\b", phases[-1]["script"])
    assert corpus(tmp_path / "slurm") == corpus(tmp_path / "local")
    slurm_report = json.loads((tmp_path / "slurm" / "curation_report.json").read_text())
    local_report = json.loads((tmp_path / "local" / "curation_report.json").read_text())
    assert slurm_report["phases"] == local_report["phases"] and slurm_report["pii"] == local_report["pii"] == {"email": 1}
