"""Parallel layouts against the single-process reference (CPU, gloo, 2, 4 and 8 processes):
loss and full gradients of the first step within 1e-5, the same losses over 3 optimizer
steps, and checkpoints that reshard: saved at one layout, loaded or resumed at others."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_domain.config import REPO_ROOT, ConfigError, config_from_dict
from megatron_domain.metrics import read_metrics
from megatron_domain.parallel.dims import resolve_parallel_dims
from megatron_domain.parallel.pipeline import layer_split, schedule_problem, stages_of_rank

from parallel_cases import clipping_scales_every_placement, layout_result, parity_config_dict, run_job, run_jobs
from parallel_harness import run_on_ranks
from conftest import chat_lines

TOL = 1e-5

TWO_RANK_LAYOUTS = {
    "tp2": ({"tp": 2, "sequence_parallel": False}, {}),
    "tp2_sp": ({"tp": 2, "sequence_parallel": True}, {}),
    "tp2_sp_tied": ({"tp": 2, "sequence_parallel": True}, {"tie_embeddings": True}),
    "pp2_gpipe": ({"pp": 2, "pp_schedule": "gpipe"}, {}),
    "pp2_1f1b": ({"pp": 2, "pp_schedule": "1f1b"}, {}),
    "pp2_interleaved_1f1b_v2": ({"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}, {}),
    "pp2_interleaved_zero_bubble_v2": ({"pp": 2, "pp_schedule": "interleaved_zero_bubble",
                                        "pp_virtual_stages": 2}, {}),
    "pp2_zbv_zero_bubble": ({"pp": 2, "pp_schedule": "zbv_zero_bubble", "pp_virtual_stages": 2}, {}),
    "pp2_uneven_1_3": ({"pp": 2, "pp_layers": [1, 3]}, {}),
    "dp_shard2": ({"dp_shard": 2}, {}),
    "dp_replicate2": ({"dp_replicate": 2, "dp_shard": 1}, {}),
}
FOUR_RANK_LAYOUTS = {
    "tp2_x_dp_shard2": ({"tp": 2, "dp_shard": 2}, {}),
    "pp2_x_tp2": ({"pp": 2, "tp": 2}, {}),
    "pp2_x_dp_shard2": ({"pp": 2, "dp_shard": 2, "pp_schedule": "gpipe"}, {}),
}
EIGHT_RANK_LAYOUTS = {
    "pp2_x_dp_shard2_x_tp2": ({"pp": 2, "dp_shard": 2, "tp": 2, "pp_schedule": "gpipe"}, {}),
}
LORA = {"rank": 4, "dropout": 0.0}
LORA_LAYOUTS = {  # LoRA adapters sharded with their base layer (TP), by FSDP, and staged by PP
    "tp2_sp_lora": {"tp": 2},
    "dp_shard2_lora": {"dp_shard": 2},
    "pp2_lora": {"pp": 2},
}
SFT_LAYOUTS = {"tp2_sp": {"tp": 2}, "dp_shard2": {"dp_shard": 2}, "pp2": {"pp": 2}}
CLIP = 0.02
ALL_LAYOUTS = {**TWO_RANK_LAYOUTS, **FOUR_RANK_LAYOUTS, **EIGHT_RANK_LAYOUTS}


def unsupported_here(parallel: dict) -> str | None:
    """Why this torch cannot run the layout over gloo (the schedule check of the engine)."""
    return schedule_problem(parallel.get("pp_schedule", ""), "gloo", torch.__version__)


@pytest.fixture(scope="module")
def results(corpora, tmp_path_factory) -> dict:
    """Every layout's result plus the reference results, computed once for the module:
    single-process references here, then one 2-process and one 4-process group."""
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for tied in (False, True):
        out[f"reference_tied={tied}"] = layout_result(
            parity_config_dict(corpora, root / f"reference_{tied}", tie_embeddings=tied))
    out["reference_lora"] = layout_result(parity_config_dict(corpora, root / "reference_lora", lora=LORA))
    # resharding: a 4-step single-process run, and the same run saved at tp=2 after step 2
    four_steps = lambda name, layout: parity_config_dict(corpora, root / name, layout, steps=4)  # noqa: E731
    out["straight"] = run_job("train", four_steps("straight", {}))
    saved_tp2 = four_steps("saved_tp2", {"tp": 2})
    saved_tp2["train"]["exit_at_step"] = 2
    jobs = [(name, "layout", parity_config_dict(corpora, root / name, par, **model), None)
            for name, (par, model) in TWO_RANK_LAYOUTS.items() if not unsupported_here(par)]
    jobs += [
        ("saved_tp2", "train", saved_tp2, None),
        ("resume_at_pp2", "resume", four_steps("resume_pp2", {"pp": 2}), str(root / "saved_tp2")),
        ("resume_at_dp_shard2", "resume", four_steps("resume_dp2", {"dp_shard": 2}), str(root / "saved_tp2")),
        ("saved_pp2", "train", parity_config_dict(corpora, root / "saved_pp2", {"pp": 2}), None),
        ("logits_tp2_from_pp2", "logits", parity_config_dict(corpora, root / "load_tp2", {"tp": 2}),
         str(root / "saved_pp2")),
        ("logits_dp_shard2_from_pp2", "logits", parity_config_dict(corpora, root / "load_dp2", {"dp_shard": 2}),
         str(root / "saved_pp2")),
    ]
    jobs += [(name, "layout", parity_config_dict(corpora, root / name, par, lora=LORA), None)
             for name, par in LORA_LAYOUTS.items()]

    def dropout(name: str, **train_kw) -> dict:
        cfg = parity_config_dict(corpora, root / name, {"tp": 2}, steps=4, lora={**LORA, "dropout": 0.1})
        cfg["train"].update(train_kw)
        return cfg

    jobs += [("tp2_dropout_straight", "train", dropout("tp2_dropout_straight"), None),
             ("tp2_dropout_first", "train", dropout("tp2_dropout_resumed", exit_at_step=2), None),
             ("tp2_dropout_resumed", "continue", dropout("tp2_dropout_resumed"), None)]
    # SFT on chat rows (assistant-only loss mask) at the layouts of pretraining
    chat = root / "chat.jsonl"
    chat.write_text("\n".join(chat_lines(48)) + "\n")  # (rows of 96 tokens: the test tokenizer splits chatml)

    def sft(name: str, parallel: dict | None = None) -> dict:
        cfg = parity_config_dict(corpora, root / name, parallel)
        cfg["mode"] = "sft"
        cfg["data"].update(seq_len=96, chat={"path": str(chat), "template": "chatml"})
        return cfg

    out["reference_sft"] = layout_result(sft("reference_sft"))
    jobs += [(f"sft_{name}", "layout", sft(f"sft_{name}", par), None) for name, par in SFT_LAYOUTS.items()]

    # gradient clipping that is active (LoRA gradients are far below the default clip of 1.0)
    def clipped(name: str, parallel: dict | None = None) -> dict:
        cfg = parity_config_dict(corpora, root / name, parallel, lora=LORA)
        cfg["optim"]["clip_grad"] = CLIP
        return cfg

    out["reference_lora_clip"] = run_job("train", clipped("reference_lora_clip"))
    jobs += [(f"{name}_clip", "train", clipped(f"{name}_clip", par), None) for name, par in LORA_LAYOUTS.items()]
    jobs.append(("dp_shard2_bf16", "layout", parity_config_dict(corpora, root / "dp_shard2_bf16", {"dp_shard": 2},
                                                                dtype="bf16"), None))
    run_on_ranks(2, run_jobs, jobs, str(root))
    for world, layouts in ((4, FOUR_RANK_LAYOUTS), (8, EIGHT_RANK_LAYOUTS)):
        jobs = [(name, "layout", parity_config_dict(corpora, root / name, par, **model), None)
                for name, (par, model) in layouts.items()]
        run_on_ranks(world, run_jobs, jobs, str(root))
    out["resume_at_one_process"] = run_job("resume", four_steps("resume_1", {}), str(root / "saved_tp2"))
    out["logits_one_process_from_pp2"] = run_job("logits", parity_config_dict(corpora, root / "load_1"),
                                                 str(root / "saved_pp2"))
    for path in root.glob("*.pt"):
        out[path.stem] = torch.load(path, weights_only=False)
    out["root"] = root
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(ALL_LAYOUTS))
def test_layout_matches_single_process(results, layout):
    """Loss and every gathered gradient of step 0 within 1e-5; 3 optimizer steps, same losses."""
    problem = unsupported_here(ALL_LAYOUTS[layout][0])
    if problem:
        pytest.skip(problem)
    tied = bool(ALL_LAYOUTS[layout][1].get("tie_embeddings"))
    ref, got = results[f"reference_tied={tied}"], results[layout]
    assert abs(got["loss"] - ref["loss"]) <= TOL
    assert sorted(got["grads"]) == sorted(ref["grads"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=TOL, msg=f"gradient of {name}")
    assert len(got["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= TOL
    assert ref["grads"]["layers.0.mlp.down_proj.weight"].abs().max() > 0  # the check is not vacuous
    if "pp" not in ALL_LAYOUTS[layout][0]:  # evaluation during training runs on the parallel model
        ref_eval = read_metrics(results["root"] / f"reference_{tied}")[-1]["eval_ppl/alpha"]
        got_eval = read_metrics(results["root"] / layout)[-1]["eval_ppl/alpha"]
        assert abs(got_eval - ref_eval) <= 1e-4 * ref_eval


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LORA_LAYOUTS))
def test_lora_layout_matches_single_process(results, layout):
    """LoRA under TP, FSDP and PP: same loss and adapter gradients as one process (only the
    adapters have gradients), and the same losses over 3 optimizer steps."""
    ref, got = results["reference_lora"], results[layout]
    assert abs(got["loss"] - ref["loss"]) <= TOL
    assert sorted(got["grads"]) == sorted(ref["grads"])
    assert all(name.endswith(("lora_a", "lora_b")) for name in ref["grads"])
    assert len(ref["grads"]) == 2 * 7 * 4  # 7 adapted linears x 4 layers
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=TOL, msg=f"gradient of {name}")
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= TOL
    assert ref["losses"][-1] < ref["losses"][0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SFT_LAYOUTS))
def test_sft_layout_matches_single_process(results, layout):
    """The sft mode (packed conversations, assistant-only loss) under TP with sequence
    parallelism, FSDP and PP: loss and gradients of step 0 and 3 steps' losses as one process."""
    ref, got = results["reference_sft"], results[f"sft_{layout}"]
    assert abs(got["loss"] - ref["loss"]) <= TOL
    assert sorted(got["grads"]) == sorted(ref["grads"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=TOL, msg=f"gradient of {name}")
    assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= TOL
    assert ref["losses"] != results["reference_tied=False"]["losses"]  # chat rows, not the pretraining blend


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LORA_LAYOUTS))
def test_active_clipping_in_lora_layouts_matches_single_process(results, layout):
    """clip_grad 0.02 is below every step's gradient norm: the clipped LoRA updates at TP, FSDP
    and PP (norm over all ranks' adapter shards) equal one process's."""
    ref = results["reference_lora_clip"]
    norms = [r["grad_norm"] for r in read_metrics(results["root"] / "reference_lora_clip")]
    assert len(norms) == 3 and min(norms) > CLIP  # clipping was active at every step
    assert ref != results["reference_lora"]["losses"]
    got = results[f"{layout}_clip"]
    assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL
    got_norms = [r["grad_norm"] for r in read_metrics(results["root"] / f"{layout}_clip")]
    assert got_norms == pytest.approx(norms, rel=1e-5)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_fp32(results):
    """dp_shard=2 with train.dtype=bf16 (FSDP computes in bf16, reduces in fp32): losses within
    1% of the fp32 single-process run, and not identical to it (bf16 really was used)."""
    ref, got = results["reference_tied=False"], results["dp_shard2_bf16"]
    assert got["loss"] != ref["loss"]
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) <= 0.01 * b


@pytest.mark.slow
def test_resume_at_other_layouts_continues_the_same_run(results):
    """Saved at tp=2 after step 2 of 4; resumed at pp=2, at dp_shard=2 and at one process:
    weights, optimizer state, schedule and data cursor carry over (losses of steps 3-4 equal
    the uninterrupted single-process run)."""
    straight = results["straight"]
    assert len(straight) == 4 and len(results["saved_tp2"]) == 2
    assert max(abs(a - b) for a, b in zip(results["saved_tp2"], straight[:2])) <= TOL
    for name in ("resume_at_pp2", "resume_at_dp_shard2", "resume_at_one_process"):
        assert len(results[name]) == 2, name
        assert max(abs(a - b) for a, b in zip(results[name], straight[2:])) <= TOL, name


@pytest.mark.slow
def test_tp2_lora_dropout_resume_is_exact(results):
    """tp=2 with LoRA dropout 0.1, stopped after step 2 of 4 and resumed: every rank's RNG is
    restored, so steps 3-4 equal the uninterrupted run exactly."""
    straight = results["tp2_dropout_straight"]
    assert len(straight) == 4
    assert results["tp2_dropout_first"] + results["tp2_dropout_resumed"] == straight


@pytest.mark.slow
def test_checkpoint_saved_at_pp2_loads_at_other_layouts(results):
    """A checkpoint written by a pp=2 run gives the same logits loaded at tp=2, at
    dp_shard=2 and in one process."""
    ref = results["logits_one_process_from_pp2"]
    assert ref.shape[-1] == 512
    for name in ("logits_tp2_from_pp2", "logits_dp_shard2_from_pp2"):
        torch.testing.assert_close(results[name], ref, rtol=0, atol=TOL, msg=name)


def test_parallel_dims_name_every_mismatch(corpora, tmp_path):
    """World size, head/KV-head/vocab divisibility, layers vs pp x virtual stages and the
    global batch vs micro-batch x dp are all reported, with their numbers."""
    bad = parity_config_dict(corpora, tmp_path, {"tp": 3, "pp": 2, "pp_virtual_stages": 3,
                                                 "pp_schedule": "interleaved_1f1b"})
    with pytest.raises(ConfigError) as err:
        config_from_dict(bad)
    text = str(err.value)
    assert "model.num_heads (4) must be divisible by parallel.tp (3)" in text
    assert "model.num_kv_heads (2) must be divisible by parallel.tp (3)" in text
    assert "model.num_layers (4) < pp x virtual stages (2 x 3 = 6)" in text
    cfg = config_from_dict(parity_config_dict(corpora, tmp_path, {"tp": 2, "dp_shard": 2, "pp": 1}))
    with pytest.raises(ConfigError, match=r"tp=2 = 4 ranks but the world size is 8"):
        resolve_parallel_dims(cfg, 8)
    cfg = config_from_dict(parity_config_dict(corpora, tmp_path, {"tp": 2}))  # dp_shard=-1: the rest
    assert resolve_parallel_dims(cfg, 8).dp_shard == 4
    with pytest.raises(ConfigError, match=r"global_batch_size: 8 is not a multiple of micro_batch_size x "
                                          r"data-parallel degree \(2 x 8 = 16\)"):
        resolve_parallel_dims(cfg, 16)
    cfg = config_from_dict(parity_config_dict(corpora, tmp_path, {"tp": 2, "dp_shard": 2, "dp_replicate": -1}))
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by the other degrees' product 4"):
        resolve_parallel_dims(cfg, 6)


def test_pipeline_layer_split_and_stage_placement():
    """Even split with the remainder in the middle; explicit uneven splits; loop and V placement."""
    assert layer_split(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert layer_split(4, 2, [1, 3]) == [(0, 1), (1, 4)]
    assert stages_of_rank(1, 4, 2, "interleaved_1f1b") == [1, 5]
    assert stages_of_rank(1, 4, 2, "zbv_zero_bubble") == [1, 6]


@pytest.mark.slow
def test_clipping_scales_partial_sharded_and_replicated_gradients():
    """torch 2.11's clip_grads_with_norm_ skips Partial(sum) DTensor gradients; ours scales
    every placement (2 gloo processes)."""
    run_on_ranks(2, clipping_scales_every_placement)


def test_v_schedule_over_gloo_needs_torch_2_12():
    """torch 2.11's pipeline warm-up sends to the same rank for the V schedule, which gloo
    cannot do: a clear error instead of gloo's "Pair is not connected"."""
    problem = schedule_problem("zbv_zero_bubble", "gloo", "2.11.0+cu130")
    assert "parallel.pp_schedule=zbv_zero_bubble" in problem and "torch >= 2.12" in problem
    assert schedule_problem("zbv_zero_bubble", "gloo", "2.12.0") is None
    assert schedule_problem("zbv_zero_bubble", "nccl", "2.11.0") is None
    assert schedule_problem("interleaved_zero_bubble", "gloo", "2.11.0") is None


def test_dry_run_plans_llama70b_without_allocating(tmp_path):
    """`mdt train --dry-run` on the llama3.1-70b preset at tp=8, pp=4, dp=2 (64 GPUs): the mesh,
    every layer on exactly one pipeline rank, parameters per GPU that add up to the model, and
    memory estimates, in a process that never holds the 280 GB of fp32 weights."""
    script = ("import json, resource, sys\n"
              "from megatron_domain.cli import main\n"
              "code = main(['train', 'configs/stages/dacpt-llama3.1-70b.yaml', '--dry-run', '--world-size', '64'])\n"
              "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mesh: pp=4 x dp_replicate=1 x dp_shard=2 x tp=8 = 64 ranks (sequence parallel)"
    plan = json.loads(next(line for line in lines if line.startswith("{")))
    assert plan["total_params"] == 70_553_706_496
    held = sorted(layer for r in plan["ranks"] for rng in r["layer_ranges"]
                  for layer in range(int(rng.split("-")[0]), int(rng.split("-")[1]) + 1))
    assert held == list(range(80))
    per_gpu_total = sum(r["params_per_gpu"] for r in plan["ranks"]) * 8 * 2  # x tp x dp_shard
    assert abs(per_gpu_total - plan["total_params"]) / plan["total_params"] < 0.001  # only norms replicate
    assert all(10 < r["memory_gb"]["total"] < 80 for r in plan["ranks"])
    maxrss_gb = int(lines[-1].split()[1]) / 2**20
    assert maxrss_gb < 3, f"dry run used {maxrss_gb:.1f} GB"
