"""Engine: exact resume, gradient accumulation, metrics log, checkpoints, clear setup errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_domain.checkpoint import latest_checkpoint
from megatron_domain.config import ConfigError, config_from_dict
from megatron_domain.engine import train
from megatron_domain.metrics import read_metrics
from megatron_domain.models.llama import build_model
from megatron_domain.optim import lr_at
from megatron_domain.parallel.apply import build_parallel_model
from megatron_domain.parallel.dims import ParallelDims

from conftest import tiny_config_dict


def test_resume_equals_uninterrupted_run(tiny_config):
    """Stop at step N/2 (checkpoint, exit), resume: the loss sequence equals the straight run."""
    straight = train(tiny_config("straight", steps=8)).losses
    first = train(tiny_config("resumed", steps=8, exit_at_step=4)).losses
    assert len(first) == 4
    second = train(tiny_config("resumed", steps=8), resume=True).losses
    assert first + second == straight  # bitwise: same data cursor, optimizer, schedule and RNG
    records = read_metrics(tiny_config("resumed").train.run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == straight
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in records)
    assert straight[-1] < straight[0]


def test_gradient_accumulation_matches_one_big_batch(tiny_config):
    """global 8 = 2 x micro 4 gives the same (token-weighted) losses as one micro-batch of 8."""
    big = train(tiny_config("big", steps=3, micro_batch_size=8, global_batch_size=8)).losses
    accumulated = train(tiny_config("acc", steps=3, micro_batch_size=4, global_batch_size=8)).losses
    assert max(abs(a - b) for a, b in zip(big, accumulated)) <= 1e-5


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_losses(tiny_config, mode):
    """Recomputing activations changes memory, not math."""
    plain = train(tiny_config("plain", steps=3)).losses
    ac = train(tiny_config("ac", steps=3, activation_checkpointing=mode)).losses
    assert max(abs(a - b) for a, b in zip(plain, ac)) <= 1e-6


class _OpCounter(TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_recomputes_what_it_should(tiny_config):
    """In backward, `full` recomputes the layers' matmuls; `selective` keeps matmul
    outputs and recomputes only cheap ops (RMSNorm's rsqrt); `none` recomputes nothing."""
    counts = {}
    for mode in ("none", "selective", "full"):
        cfg = tiny_config(mode, activation_checkpointing=mode)
        model = build_parallel_model(build_model(cfg.model), cfg, ParallelDims(1, 1, 1, 1), None,
                                     torch.device("cpu"), init_seed=0).parts[0]
        tokens = torch.randint(0, 400, (2, 16))
        positions = torch.arange(16).expand(2, 16)
        loss = model(tokens, positions).float().pow(2).mean()
        with _OpCounter() as counter:
            loss.backward()
        counts[mode] = (sum(counter.counts.get(op, 0) for op in ("mm", "addmm", "bmm")),
                        counter.counts.get("rsqrt", 0))
    assert counts["none"][1] == 0
    assert counts["selective"][0] == counts["none"][0] and counts["selective"][1] > 0
    # full: 6 of each layer's 7 linears run again (non-reentrant recompute stops early: the
    # last one's output, down_proj's, is not needed by backward)
    assert counts["full"][0] == counts["none"][0] + 6 * cfg.model.num_layers and counts["full"][1] > 0


def test_checkpoints_are_complete_and_atomic(tiny_config):
    """Every N steps and at the end; no temporary directory left; `latest` points at the last."""
    cfg = tiny_config("ckpt", steps=4, checkpoint_every=2)
    train(cfg)
    root = latest_checkpoint(cfg.train.run_dir).parent
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    extra = json.loads((root / "step_0000004" / "extra.json").read_text())
    assert extra["stage"]["consumed_samples"] == 4 * cfg.train.global_batch_size
    assert extra["scheduler"]["last_epoch"] == 4


def test_new_run_refuses_a_run_dir_with_checkpoints(tiny_config):
    """A second run without --resume must not mix with the first: refused with the ways out;
    --overwrite moves the old run aside (nothing deleted) and starts anew."""
    cfg = tiny_config("taken", steps=4, checkpoint_every=2)
    losses = train(cfg).losses
    run_dir = Path(cfg.train.run_dir)
    before = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints up to step 4\).*--resume.*"
                                              r"train.run_dir.*--overwrite"):
        train(tiny_config("taken", steps=2))
    after = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # untouched
    again = train(tiny_config("taken", steps=2), overwrite=True)
    assert again.losses == losses[:2]
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("taken.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_0000004").is_dir()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_resume_of_a_finished_run_says_so(tiny_config, capsys):
    cfg = tiny_config("done", steps=2)
    final = train(cfg).final_checkpoint
    result = train(cfg, resume=True)
    assert result.losses == [] and result.final_checkpoint == final
    assert "already finished its 2 steps" in capsys.readouterr().out


class _RunsCode:
    """A pickle payload that creates a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_checkpoint_pickles_that_run_code_are_refused(tiny_config, tmp_path):
    """A crafted RNG file or DCP metadata in a received checkpoint is refused before it runs:
    on --resume, as model.init_from and in mdt eval."""
    import pickle

    from megatron_domain.eval.harness import run_eval

    cfg = tiny_config("received", steps=4, exit_at_step=2)
    checkpoint = train(cfg).final_checkpoint
    marker = tmp_path / "marker"
    (checkpoint / "rng_rank0.pt").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match=r"rng_rank0.pt: refused to load"):
        train(cfg, resume=True)
    assert not marker.exists()
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match=r"\.metadata: refused to load the checkpoint: global builtins.exec"):
        train(cfg, resume=True)
    with pytest.raises(ValueError, match="refused to load the checkpoint"):
        run_eval(cfg, str(checkpoint))
    init = tiny_config("from_received")
    init.model.init_from = str(checkpoint)
    with pytest.raises(ValueError, match="refused to load the checkpoint"):
        train(init)
    assert not marker.exists()


def test_model_changed_since_the_checkpoint_is_named(corpora, tmp_path):
    """--resume or mdt eval with a model config that differs from the run's: one message naming
    the run's config.json, each differing field and the fix, not a state-dict traceback."""
    from megatron_domain.eval.harness import run_eval

    data = tiny_config_dict(corpora, tmp_path / "run", steps=4, exit_at_step=2)
    train(config_from_dict(data))
    data["model"].update(num_layers=3, hidden_size=96)
    changed = config_from_dict(data)
    pattern = (r"written with another model config: model.hidden_size: 96 here but 64 in .*run/config.json; "
               r"model.num_layers: 3 here but 2 in .*run/config.json\. Use the checkpoint's model config")
    with pytest.raises(ValueError, match=r"--resume: .*" + pattern):
        train(changed, resume=True)
    with pytest.raises(ValueError, match=r"checkpoint .*run.*" + pattern):
        run_eval(changed, str(tmp_path / "run"))


@pytest.mark.parametrize("key, value, package", [
    ("model.attention_backend", "flash_varlen", "flash_attn"),
    ("model.attention_backend", "te", "transformer_engine"),
    ("fp8.backend", "te", "transformer_engine"),
])
def test_missing_optional_backend_is_named_before_anything_is_written(corpora, tmp_path, key, value, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    data = tiny_config_dict(corpora, tmp_path / "run")
    section, _, name = key.partition(".")
    data.setdefault(section, {})[name] = value
    with pytest.raises(ValueError, match=rf"^{key}={value} needs .* not installed here; install it or use "):
        train(config_from_dict(data))
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_model_vocab(corpora, tmp_path):
    data = tiny_config_dict(corpora, tmp_path / "run")
    data["model"]["vocab_size"] = 100
    with pytest.raises(ValueError, match=r"model.vocab_size is 100; set model.vocab_size >= \d+"):
        train(config_from_dict(data))


def test_seq_len_above_model_maximum(corpora, tmp_path):
    data = tiny_config_dict(corpora, tmp_path / "run")
    data["data"]["seq_len"] = 4096
    with pytest.raises(ConfigError, match=r"data.seq_len: 4096 exceeds model.max_seq_len \(256\)"):
        config_from_dict(data)


def test_missing_corpus_names_the_field(corpora, tmp_path):
    data = tiny_config_dict(corpora, tmp_path / "run")
    data["data"]["corpora"][1]["path"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"data.corpora\[1\].path: .*missing.bin does not exist"):
        train(config_from_dict(data))


def test_lr_schedule_warmup_then_cosine(tiny_config):
    cfg = tiny_config().optim
    assert lr_at(0, cfg, 100) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps, cfg, 100) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg, 100) == pytest.approx(cfg.min_lr)
    mid = lr_at((100 + cfg.warmup_steps) // 2, cfg, 100)
    assert mid == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=0.05)


def test_no_weight_decay_on_norms_and_biases(tiny_config):
    from megatron_domain.models.llama import build_model, materialize
    from megatron_domain.optim import parameter_groups

    cfg = config_from_dict({"model": {"preset": "tiny-test", "qkv_bias": True}, "data": {"seq_len": 64}})
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith(("norm.weight", "bias")) for n in (names[id(p)] for p in no_decay["params"]))
    assert all(names[id(p)].endswith("proj.weight") or "embed" in names[id(p)] or "lm_head" in names[id(p)]
               for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_bf16_autocast_tracks_fp32(tiny_config):
    """bf16 autocast (params and optimizer in fp32) gives losses close to fp32 on the tiny model."""
    fp32 = train(tiny_config("fp32", steps=3)).losses
    bf16 = train(tiny_config("bf16", steps=3, dtype="bf16")).losses
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) <= 0.05
    assert fp32 != bf16  # autocast really changed the matmul precision
