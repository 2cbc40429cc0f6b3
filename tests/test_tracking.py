"""TensorBoard and W&B (offline) sinks get the records of metrics.jsonl: the event files are
read back with TensorBoard's own reader, the W&B offline run directory is checked; a missing
package is a clear error naming the extra. Both packages are in the [test] extra, so these
tests always run."""

from __future__ import annotations

import json
import sys

import pytest

from megatron_domain.config import config_from_dict
from megatron_domain.engine import train
from megatron_domain.metrics import read_metrics
from megatron_domain.tracking import wandb_run_id

from parallel_cases import parity_config_dict

def test_tensorboard_and_wandb_offline_get_the_metrics_records(corpora, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = parity_config_dict(corpora, run_dir, steps=3)
    cfg["tracking"] = {"tensorboard": True, "wandb": "offline", "wandb_project": "test"}
    train(config_from_dict(cfg))
    records = read_metrics(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == pytest.approx(
        [(r["step"], r["loss"]) for r in records], abs=1e-6)
    assert [e.value for e in events.Scalars("eval_ppl/alpha")] == pytest.approx([records[-1]["eval_ppl/alpha"]])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"seq_len": 32' in config_text
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    # the run's transaction log (protobuf records, uploaded by `wandb sync`) holds every logged
    # value as JSON text and the resolved config
    log = next(offline[0].glob(f"run-{wandb_run_id(run_dir)}.wandb")).read_bytes()
    for record in records:
        assert json.dumps(record["loss"]).encode() in log
    assert json.dumps(records[-1]["eval_ppl/alpha"]).encode() in log and b"seq_len" in log


@pytest.mark.parametrize("key,value", [("wandb", "offline"), ("tensorboard", True)])
def test_a_missing_tracking_package_names_the_extra(corpora, tmp_path, monkeypatch, key, value):
    """The package absent (None in sys.modules is how Python marks a module as not importable):
    refused before anything is written, naming the key and the extra."""
    monkeypatch.setitem(sys.modules, key, None)
    cfg = config_from_dict({**parity_config_dict(corpora, tmp_path / "run"), "tracking": {key: value}})
    with pytest.raises(ValueError, match=rf"tracking.{key} needs the {key} package.*megatron-domain\[track\]"):
        train(cfg)
    assert not (tmp_path / "run").exists()
