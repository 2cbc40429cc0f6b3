"""Experiment tracking sinks: TensorBoard and Weights & Biases, fed the records that go to
`metrics.jsonl` (numeric values, keyed by step), plus the resolved config and a pipeline
stage's evaluation. Rank 0 only. Each package is imported here and nowhere else, and only when
its sink is configured (the `[track]` extra)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from megatron_domain.config import Config, TrackingConfig, to_dict

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracking(t: TrackingConfig) -> None:
    """A configured sink whose package is missing is an error naming the key and the extra."""
    wanted = [key for key, on in (("tensorboard", t.tensorboard), ("wandb", bool(t.wandb))) if on]
    for key in wanted:
        if importlib.util.find_spec(PACKAGES[key]) is None:
            raise ValueError(f"tracking.{key} needs the {PACKAGES[key]} package, which is not installed here: "
                             "pip install 'megatron-domain[track]' (or turn it off)")


def numeric(record: dict, prefix: str = "") -> dict[str, float]:
    """The int/float values of a (nested) record, keys joined with '/'."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def wandb_run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run (and a pipeline stage's eval)
    continues the same W&B run."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


class Trackers:
    """The configured sinks of one run directory; `log` takes metrics.jsonl records."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.writer = None
        self.wandb_run = None
        t = cfg.tracking
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            self.writer.add_text("config", "```\n" + json.dumps(to_dict(cfg), indent=2) + "\n```")
        if t.wandb:
            import wandb

            self.wandb_run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None, mode=t.wandb,
                                        dir=str(self.run_dir), name=self.run_dir.name, id=wandb_run_id(self.run_dir),
                                        resume="allow", config=to_dict(cfg), reinit="create_new")

    def log(self, record: dict) -> None:
        """One metrics.jsonl record (its `step` is the x axis)."""
        step = int(record.get("step", 0))
        values = {k: v for k, v in numeric(record).items() if k != "step"}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_summary(self, results: dict, step: int) -> None:
        """Evaluation results (nested dicts of numbers) at `step`, e.g. a stage's before/after."""
        self.log({"step": step, **numeric(results)})
        if self.wandb_run is not None:
            self.wandb_run.summary.update(numeric(results))

    def close(self) -> None:
        """Flush and close every sink."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            self.wandb_run = None
            # finish() only tells the wandb service the run is over; the service writes the rest of
            # the transaction log (run-<id>.wandb) later. teardown() waits for it to finish and exit,
            # so the log is complete when close() returns (a reader or `wandb sync` right after saw
            # only the file header under load) and no service outlives a worker process.
            wandb.teardown()
