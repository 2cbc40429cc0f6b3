"""Typed configuration tree, loaded from YAML with `--set a.b=c` overrides.

Every command reads one of two roots: `Config` (one training / eval run) or `PipelineConfig`
(several stages run one after another). Loading collects *all* problems before failing:
unknown keys (with the nearest valid key suggested), wrong types and semantic checks
(`validate`), each reported with its dotted path and what to do about it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_PRESET_DIR = REPO_ROOT / "configs" / "models"

MODES = ("pretrain", "sft", "dpo", "rs_sft")
CHAT_MODES = ("sft", "dpo", "rs_sft")  # modes that train on chat data: their exports and servers speak chat
DTYPES = ("fp32", "bf16", "auto")  # auto: precision.fast_training_dtype
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble")
ATTENTION_BACKENDS = ("sdpa", "flex", "flash_varlen", "te")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZE_BASE = ("none", "nf4")
HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
ROLLOUT_BACKENDS = ("native", "vllm")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")  # losses.DPO_LOSS_TYPES (config imports nothing of ours)
DPO_REFERENCES = ("auto", "adapters", "copy", "precomputed")
GOLD_AGAINST = ("worst", "best_miss", "both")  # dpo.gold_against
JUDGE_KINDS = ("rubric", "pairwise", "panel")
GENERATION_METRICS = ("format_adherence", "citation_accuracy", "refusal_in_scope", "refusal_out_of_scope",
                      # domain metrics against the questions' references (eval/domain_metrics.py)
                      "qa_exact_match", "qa_normalized_match", "qa_f1", "citation_precision", "citation_recall",
                      "over_refusal", "under_refusal")
DIALOGUE_METRICS = ("dialogue_score", "late_retention")  # eval.dialogues, as shares (score / 100)
PAIRWISE_BACKENDS = ("model", "openai")
PANEL_VOTES = ("majority", "mean")
KEEP_PER = ("seed", "global")
VLLM_DTYPES = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = ""):
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''} ({len(problems)} problem(s)):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


# --------------------------------------------------------------------------- dataclass tree


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling; `type: llama3` is Llama 3.1's long-context scheme."""

    type: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """Llama-family decoder shape. `preset` names a file in configs/models/ (or a YAML path)."""

    preset: str = ""
    vocab_size: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention_backend: str = "sdpa"
    init_from: str = ""
    hf_architecture: str = ""

    @property
    def resolved_head_dim(self) -> int:
        """Head dimension: `head_dim` when set, else hidden_size / num_heads."""
        return self.head_dim or (self.hidden_size // max(self.num_heads, 1))


@dataclass
class CorpusConfig:
    """One tokenized corpus (Megatron indexed dataset prefix) and its blend weight."""

    path: str = ""
    weight: float = 1.0
    name: str = ""


@dataclass
class ChatDataConfig:
    """Conversations for the `sft` mode (JSONL, see data/chat.py): the chat template (llama3,
    chatml, or `tokenizer` for the tokenizer's own) and what to do with an example longer than
    data.seq_len (truncate or drop; the count is reported). `replay` (sft, rs_sft): the share of
    each micro-batch's rows taken from `data.corpora` as raw text (loss on every token), e.g.
    0.25, so fine-tuning on chat does not erode the base model's language modelling.
    `replay_loss_weight`: each replay token's weight in the loss (a conversation token's is 1;
    the loss is the weighted mean). A raw-text row has a loss on every token, a conversation row
    only on its assistant turns, so at weight 1 a small share of replay rows can carry most of
    the loss; a weight below 1 lets the replay hold language modelling without drowning the
    chat signal (the demo: README)."""

    path: str = ""
    template: str = "chatml"
    overflow: str = "truncate"
    replay: float = 0.0
    replay_loss_weight: float = 1.0


@dataclass
class DataConfig:
    """Training data: tokenizer, packed sequence length and the weighted corpus blend."""

    tokenizer: str = ""
    eod_token: str = ""
    seq_len: int = 512
    corpora: list[CorpusConfig] = field(default_factory=list)
    cache_dir: str = ""
    seed: int = 1234
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)


# signals a scheduler sends before it stops a job (SIGKILL cannot be caught)
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr`. `implementation`: auto (fused on
    CUDA and on CPUs with AVX-512, foreach on other CPUs: the faster one measured on each),
    fused or foreach. They differ by float rounding only, which a short fine-tuning stage can
    still amplify into different results (the demo pins foreach, the rounding it was tuned with)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    clip_grad: float = 1.0
    implementation: str = "auto"


@dataclass
class TrainConfig:
    """The loop: steps, batch sizes, precision, checkpointing and logging. `dtype`: fp32, bf16
    (autocast; parameters and optimizer states stay fp32) or auto (bf16 where the device runs it
    fast: CUDA with bf16, CPUs with AMX or AVX-512 BF16; fp32 elsewhere; the choice and its
    reason are printed and the run's config.json records the resolved dtype).

    Cluster behaviour: `checkpoint_every` (steps) and/or `checkpoint_every_minutes` (wall
    time, decided by all ranks together); `keep_last_checkpoints` (0 = all) deletes older
    checkpoints only after a newer one is complete; on any of `preempt_signals` (e.g. Slurm's
    `--signal=USR1@300`) every rank finishes its step, a checkpoint is written at that step and
    the run exits 0; `hang_timeout_s` > 0: a step (with its eval and checkpoint) that takes
    longer dumps every thread's Python stack (faulthandler) and exits 1 so the scheduler can
    requeue.

    `compile`: regional torch.compile, each decoder layer compiled on its own (the embedding,
    output layer and loss stay eager), applied after activation checkpointing and before FSDP.
    Where a combination is not safe on this torch the run stays eager and prints why: tensor
    parallelism (DTensor layers: on torch 2.13 the compiled backward fails, and with FSDP x TP
    the embedding gradient came out zero)."""

    run_dir: str = "runs/default"
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 4
    dtype: str = "fp32"
    activation_checkpointing: str = "none"
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_last_checkpoints: int = 0
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    hang_timeout_s: float = 0.0
    exit_at_step: int = 0
    peak_tflops: float = 0.0
    progress: bool = True


@dataclass
class ParallelConfig:
    """Parallel degrees; their product is the world size. `-1` means "the rest of the world
    size" (at most one degree may be -1). Mesh order (outer -> inner): pp, dp_replicate,
    dp_shard, tp, so TP groups are the closest ranks (one node) and PP the farthest.

    - tp: tensor parallel (DTensor column/row sharding, vocab-parallel embedding, output and
      cross-entropy); `sequence_parallel` also shards norms and residuals along the sequence.
    - pp: pipeline stages (`torch.distributed.pipelining`); `pp_virtual_stages` model chunks
      per rank for the interleaved / zero-bubble schedules; `pp_layers` gives the layer count
      of every stage (pp x virtual entries, in stage order) for uneven splits.
    - dp_shard: FSDP2 (`fully_shard`) degree; dp_replicate: replicas of the sharded group (HSDP,
      or DDP-like when dp_shard is 1).
    """

    tp: int = 1
    pp: int = 1
    dp_shard: int = -1
    dp_replicate: int = 1
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    pp_layers: list[int] = field(default_factory=list)


@dataclass
class LoraConfig:
    """LoRA adapters (rank 0 = off: full fine-tuning). `alpha` 0 means 2 x rank. With
    `quantize_base: nf4` the frozen base weights are stored in 4-bit NF4 (QLoRA)."""

    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    quantize_base: str = "none"

    @property
    def scale_alpha(self) -> float:
        """alpha, defaulting to 2 x rank."""
        return self.alpha or 2.0 * self.rank


@dataclass
class EvalSetConfig:
    """A named held-out set (indexed dataset prefix)."""

    name: str = ""
    path: str = ""


@dataclass
class RubricRuleConfig:
    """One rule of a rubric judge; an answer's score is the weighted sum of the rules it passes.

    `pattern`: a regular expression searched in the answer (`must_match: false` inverts it);
    `{field}` placeholders are filled from the prompt record (regex-escaped), e.g.
    "\\[source: `{source}`\\]" checks the citation against the prompt's known source. Or
    `function: module:function` called as f(prompt_record, answer) -> score (float in [0, 1])
    or (score, reason). A rule with `when` applies only to prompts whose record has that
    truthy field (`when: "!field"`: only where it is missing or false)."""

    name: str = ""
    pattern: str = ""
    must_match: bool = True
    function: str = ""
    weight: float = 1.0
    when: str = ""
    constraint: bool = False  # rs_sft: a constraint stated in turn 1; its pass rate per turn is "retention"


@dataclass
class JudgeConfig:
    """The judge of an online stage (judges/): `rubric` (rules), `pairwise` (a stronger model
    compares two answers, asked twice with the positions swapped; `backend: model` scores the
    verdict tokens' log-probs with a checkpoint of ours or an HF folder in `model`,
    `backend: openai` asks the endpoint `url` for `model`), or `panel` (the `members` vote by
    `vote`: majority or mean)."""

    kind: str = "rubric"
    rules: list[RubricRuleConfig] = field(default_factory=list)
    backend: str = "model"
    model: str = ""
    url: str = ""
    timeout_s: float = 60.0
    retries: int = 3
    max_concurrency: int = 8
    members: list[dict] = field(default_factory=list)
    vote: str = "mean"


@dataclass
class GenerationEvalConfig:
    """Greedy-decoding eval on held-out questions ({"prompt", "source"} JSONL; source null = out
    of scope; optional "sources" [ids] and "answer" references): house-format adherence,
    citation accuracy, the domain metrics (QA exact / normalized match and F1 against "answer",
    citation precision / recall against the gold sources) and, with `refusal` (the house refusal
    sentence) or `refusal_patterns` (regular expressions, searched in the answer), refusal rates
    in and out of scope (over- and under-refusal); `kl_samples` > 0: KL(policy || the stage's
    initial model) estimated from that many sampled answers per question (eval/rubric.py,
    eval/domain_metrics.py). Empty path = off."""

    path: str = ""
    template: str = "chatml"
    max_new_tokens: int = 64
    max_examples: int = 0
    refusal: str = ""
    refusal_patterns: list[str] = field(default_factory=list)
    kl_samples: int = 0


@dataclass
class DialogueEvalConfig:
    """Multi-turn eval on held-out seeds (the rs_sft seed format): each seed's dialogue is
    generated greedily (follow-ups from the seed, else `follow_ups` cycled) and scored by
    `judge` (a rubric scores every assistant turn). Reports the mean dialogue score, constraint
    retention per turn and on turns >= `late_turn`, and each rule's pass rate on those late
    turns. Empty seeds = off."""

    seeds: str = ""
    template: str = "chatml"
    turns: int = 6
    follow_ups: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    late_turn: int = 6
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class EvalSuiteConfig:
    """lm-evaluation-harness tasks run on the model (eval/suites.py): `tasks` (lm-eval names; the
    local copies mmlu_local, arc_easy_local, arc_challenge_local, hellaswag_local, gsm8k_local and
    the demo's demo_general_mc / demo_domain_mc read `data_dir`), `include_path` (a folder of
    your own task YAMLs), `num_fewshot` (-1: each task's default), `limit` (examples per task,
    0 = all), `apply_chat_template` (render prompts with the run's chat template)."""

    name: str = ""
    tasks: list[str] = field(default_factory=list)
    data_dir: str = ""
    include_path: str = ""
    num_fewshot: int = -1
    limit: int = 0
    batch_size: int = 16
    max_length: int = 0
    apply_chat_template: bool = False
    log_samples: bool = False


@dataclass
class EvalConfig:
    """Held-out perplexity sets; `interval` > 0 also evaluates every that many training steps
    (logged as `eval_ppl/<name>`); `max_rows` caps rows of `seq_len` tokens per set (0 = all)."""

    sets: list[EvalSetConfig] = field(default_factory=list)
    interval: int = 0
    max_rows: int = 0
    batch_size: int = 8
    seq_len: int = 0
    generation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    dialogues: DialogueEvalConfig = field(default_factory=DialogueEvalConfig)
    suites: list[EvalSuiteConfig] = field(default_factory=list)


@dataclass
class Fp8Config:
    """FP8 linear layers. backend: none, float8 (torchao Float8Linear; composes with TP and
    FSDP2) or te (Transformer Engine, fp8_autocast). recipe: float8 -> tensorwise (default),
    rowwise, rowwise_with_gw_hp; te -> delayed (default) or current. emulate: run float8's casts
    with high-precision matmuls (CPU, GPUs without FP8 tensor cores)."""

    backend: str = "none"
    recipe: str = ""
    emulate: bool = False

    @property
    def resolved_recipe(self) -> str:
        """The recipe, or the backend's default."""
        return self.recipe or {"float8": "tensorwise", "te": "delayed"}.get(self.backend, "")


FP8_RECIPES = {"none": ("",), "float8": ("tensorwise", "rowwise", "rowwise_with_gw_hp"), "te": ("delayed", "current")}

# kernel op -> its implementations; megatron_domain/kernels/registry.py maps each to a function
KERNEL_IMPLEMENTATIONS = {"pack_metadata": ("reference", "cpp", "cuda"),
                          "linear_logprobs": ("reference", "chunked", "triton"),
                          "dpo_loss": ("reference", "cpp", "cuda")}


@dataclass
class KernelsConfig:
    """Which implementation runs each kernel op (see megatron_domain/kernels/registry.py):
    `auto` (fastest one ready on the device), `reference`, or a named one (pack_metadata:
    cpp|cuda; linear_logprobs: chunked|triton; dpo_loss: cpp|cuda)."""

    pack_metadata: str = "auto"
    linear_logprobs: str = "auto"
    dpo_loss: str = "auto"
    logprob_chunk_rows: int = 0  # rows per logits slice of the chunked/triton logprobs; 0 = ~64 MiB slices
    # the causal-LM loss through linear_logprobs (no full [B, S, V] logits): true, false, or auto =
    # on unless parallel.pp > 1 (the last pipeline stage scores logits) or linear_logprobs is the reference
    fused_cross_entropy: bool | str = "auto"


@dataclass
class VllmConfig:
    """The in-process vLLM engine (`rollout.backend: vllm` without `rollout.urls`). dtype auto =
    the training dtype (fp32 or bf16). `kv_cache_gb`: KV-cache memory (CPU: reserved RAM; GPU:
    0 = vLLM's own sizing from `gpu_memory_utilization`). `max_loras` must exceed the adapters
    in use at once by one (vLLM returns wrong tokens for no-adapter requests batched with adapter
    requests otherwise; the backend then splits such batches). `engine_args`: any other
    `vllm.LLM` keyword."""

    dtype: str = "auto"
    max_model_len: int = 0  # 0 = model.max_seq_len
    gpu_memory_utilization: float = 0.5
    kv_cache_gb: float = 1.0
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    max_loras: int = 2
    engine_args: dict = field(default_factory=dict)


@dataclass
class RolloutConfig:
    """Generation for online stages, `mdt generate` and the generation eval.

    backend: `native` (our model with a KV cache; the reference) or `vllm` (in-process engine on
    the exported policy, or the OpenAI-compatible servers in `urls`, requests spread over them).
    Sampling: temperature (0 = greedy), top_p, top_k (0 = off), n samples per prompt, seed.
    Weight sync (vllm): every sync times out after `sync_timeout_s` with an error naming what was
    synced where; servers read full weights from `weights_dir` (a folder they can see; default
    <run_dir>/rollout_weights). After each sync a probe compares vLLM's log-probs of
    `probe_sequences` fixed sequences with the trainer's: a per-token difference above
    `probe_tolerance` (0 = 2e-3 for fp32 engines, 0.1 for bf16/fp16) is an error."""

    backend: str = "native"
    urls: list[str] = field(default_factory=list)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    max_batch_sequences: int = 64
    request_timeout_s: float = 600.0
    sync_timeout_s: float = 300.0
    weights_dir: str = ""
    probe_sequences: int = 2
    probe_tolerance: float = 0.0
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class DpoConfig:
    """The `dpo` mode (stages/dpo.py). Offline: pairs from data.chat.path. Online
    (`online: true`): `rounds` rounds, each samples `samples_per_prompt` completions of
    `prompts_per_round` prompts from `prompts` with the current policy (rollout.*), judges them
    (`judge`), pairs best vs worst (score gap >= `min_score_margin`) and trains
    `steps_per_round` steps on them (train.steps = rounds x steps_per_round).

    reference: `adapters` (LoRA: the base with adapters off), `copy` (a frozen copy of the
    initial weights), `precomputed` (reference log-probs computed once, stored with the run);
    `auto` = adapters with LoRA, else copy. `shared_prompt`: score both completions after one
    pass over the prompt (sdpa/flex attention), else the two-document layout. `sft_weight` > 0
    adds that times the chosen completion's mean NLL to each pair's loss (RPO).

    `anchors` (online): fixed completions judged with every prompt's samples, e.g. the house
    refusal sentence, each prompt getting a second pair: the anchor against the sample farthest
    from it in score. Where the judge ranks the anchor high (an out-of-scope question) the
    refusal is chosen, even before the policy samples one; where low (an answerable one) it is
    rejected, so the pairs teach both sides of a rule that sampling alone shows one side of.

    `gold_field` (online): the name of a prompt-file key holding that prompt's own known-good
    completion (e.g. `answer`), judged with its samples and paired like an anchor. Where the
    policy's samples all miss (a wrong section retrieved at every temperature-0.3 sample) no
    sampled pair teaches the right answer; the gold one is chosen against the worst sample.
    Prompts without the key get no gold completion. `gold_against: best_miss` pairs the gold
    completion against the best sample the judge ranks below it instead (the hard negative: a
    well-formed answer citing the wrong section, not a derailed one), where there is one;
    `both` does that and, where the gold completion outranks every sample, also makes it the
    chosen side of the sampled pair (gold vs worst), which would otherwise choose a miss."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    reference: str = "auto"
    shared_prompt: bool = True
    online: bool = False
    prompts: str = ""
    rounds: int = 1
    prompts_per_round: int = 8
    samples_per_prompt: int = 2
    steps_per_round: int = 1
    min_score_margin: float = 0.0
    anchors: list[str] = field(default_factory=list)
    gold_field: str = ""
    gold_against: str = "worst"
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class CollapseGuardConfig:
    """Diversity of the dialogues rs_sft keeps, against thresholds: distinct bigrams of the
    assistant turns (share of bigrams that are unique), the share of the most common opening
    sentence, and the mean pairwise similarity of one seed's kept dialogues. A threshold that
    is crossed warns; with `fail` the stage stops before training on the kept set."""

    min_distinct_2: float = 0.0
    max_top_opening_share: float = 1.0
    max_self_similarity: float = 1.0
    fail: bool = False


@dataclass
class RsSftConfig:
    """The `rs_sft` mode (stages/rs_sft.py): from each seed of `seeds` (JSONL) sample
    `dialogues_per_seed` dialogues of the seed's turns (else `turns`) with the current policy
    (rollout.*), the user's follow-up turns coming from the seed, else from a model playing the
    user (`user_model`: `policy`, a checkpoint or HF folder; or the chat endpoint `user_url`
    serving `user_model`; prompted with `user_instruction`), else cycled from `follow_ups`;
    score every whole dialogue with `judge` (a rubric scores each assistant turn), keep the top
    `keep_fraction` per seed (`keep_per: seed`) or of all (`global`) scoring at least
    `min_score` (0-100), drop near-duplicates of one seed (word-set similarity >=
    `dedup_similarity`), check the kept set's diversity (`collapse`), and train an SFT pass on
    the survivors: every generated assistant turn (`train_on: all`), or only the turns the rubric
    passed in full (`passing`: failed turns stay as context). train.steps: 0 = `epochs` over
    the kept (and replayed) rows. `rounds` > 1 repeats generate -> judge -> keep -> train (as
    ReST's grow and improve steps): each round trains train.steps / rounds steps (train.steps 0:
    `epochs` over round 0's rows), and the next round samples from the policy as trained so far; round k > 0
    keeps its files in `<run_dir>/rounds/<k>/`.

    `replay` (a chat JSONL, e.g. the SFT stage's data) with `replay_fraction` > 0: that many
    conversations per kept dialogue, drawn from it (seeded by data.seed and the round), train
    beside the kept dialogues (every assistant turn), so the pass on self-generated dialogues
    does not wear away what they rarely show (single-turn answers, refusals).

    `gold_field` (rubric judge): the key under which a seed holds a turn's known-good answer (at
    the top level for turn 1, in a follow-up object for its turn; null: none). In each kept
    dialogue a turn the rubric failed is replaced by its gold answer, when that passes the rubric,
    and trained on (STaR's rationalization; stages/corrections.py); counted in rs_sft.json."""

    seeds: str = ""
    dialogues_per_seed: int = 8
    turns: int = 6
    follow_ups: list[str] = field(default_factory=list)
    user_model: str = ""
    user_url: str = ""
    user_instruction: str = ("You are the user in this conversation. Ask the assistant one short follow-up question "
                             "about the same subject. Reply with the question only.")
    seeds_per_chunk: int = 16
    keep_fraction: float = 0.25
    keep_per: str = "seed"
    min_score: float = 0.0
    dedup_similarity: float = 0.9
    epochs: float = 1.0
    rounds: int = 1
    train_on: str = "all"
    replay: str = ""
    replay_fraction: float = 0.0
    gold_field: str = ""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    collapse: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)


@dataclass
class TrackingConfig:
    """Experiment tracking besides `<run_dir>/metrics.jsonl`, fed the same records (rank 0):
    `tensorboard` writes event files to `<run_dir>/tensorboard`; `wandb`: "" (off), online or
    offline (offline runs go to `<run_dir>/wandb`, upload later with `wandb sync`). The
    resolved config and each pipeline stage's eval go along. Needs the `[track]` extra."""

    tensorboard: bool = False
    wandb: str = ""
    wandb_project: str = "megatron-domain"
    wandb_entity: str = ""


@dataclass
class Config:
    """One run of the engine in one mode."""

    mode: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rs_sft: RsSftConfig = field(default_factory=RsSftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class DemoDataConfig:
    """The embedded demo corpora (Python's own docs), prepared before the first stage."""

    enabled: bool = False
    vocab_size: int = 2048
    heldout_fraction: float = 0.1
    max_general_docs: int = 0
    max_domain_docs: int = 0
    seed: int = 0
    # the domain training documents go through `mdt data curate` (with injected duplicates,
    # near-duplicates, PII, low-quality and off-topic documents) before they are tokenized
    curate: bool = False
    sft_heldout_fraction: float = 0.5  # share of the out-of-scope topics held out for the eval (at least 0.4)
    sft_refusal_topics: int = 6  # out-of-scope topics whose refusal sentence the SFT data shows
    rs_seeds: int = 32  # multi-turn seeds for an rs_sft stage (rs_seeds.jsonl)
    rs_heldout_seeds: int = 12  # held-out seeds for the multi-turn eval (rs_heldout_seeds.jsonl)
    dialogue_turns: int = 6
    rs_single_seeds: int = 0  # one-turn seeds without the dialogue rule among the rs_sft seeds (half out of scope)


@dataclass
class GateConfig:
    """A regression gate (or, with `stop: false`, a reported target) of one pipeline stage,
    checked on the stage's eval after training against its own eval before. `metric`:
    `ppl/<eval set>`; an lm-eval suite metric `<task>/<metric>` (e.g. mmlu_local/acc); a
    generation metric (GENERATION_METRICS: format_adherence, citation_accuracy, refusal_in_scope,
    refusal_out_of_scope, and the domain metrics qa_exact_match, qa_normalized_match, qa_f1,
    citation_precision, citation_recall, over_refusal, under_refusal) or a dialogue metric (dialogue_score, late_retention). Bounds (unset =
    no bound): `min` / `max` on the value after; `max_drop` (before - after), `min_gain` and
    `max_gain` (after - before) in the metric's own units (0.02 = 2 points of a share);
    `max_rise`: the relative change (after - before) / before, e.g. 0.05 = at most 5% higher,
    -0.30 = at least 30% lower (perplexities). A failed gate with `stop` ends the pipeline
    after the stage (`mdt pipeline --continue-on-gate-failure` overrides)."""

    metric: str = ""
    min: float = math.nan
    max: float = math.nan
    max_drop: float = math.nan
    min_gain: float = math.nan
    max_gain: float = math.nan
    max_rise: float = math.nan
    stop: bool = True


GATE_BOUNDS = ("min", "max", "max_drop", "min_gain", "max_gain", "max_rise")


@dataclass
class PipelineConfig:
    """Stages run in order; each stage = `defaults` deep-merged with the stage's own keys. A
    stage's `gates:` list (GateConfig entries) is checked after it (see `stage_gates`)."""

    out_dir: str = "runs/pipeline"
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    defaults: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- dict -> dataclass


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return []
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{path}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{path}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return ""
    return value


# names other trainers use for our keys (HF TrainingArguments, TRL, Megatron), suggested when
# they appear where ours is expected
KEY_ALIASES = {"learning_rate": "lr", "chat_template": "chat.template", "max_steps": "steps", "train_iters": "steps",
               "num_train_steps": "steps", "max_grad_norm": "clip_grad", "gradient_clipping": "clip_grad",
               "warmup_iters": "warmup_steps", "output_dir": "run_dir", "save_dir": "run_dir",
               "save_steps": "checkpoint_every", "logging_steps": "log_every", "seed_value": "seed",
               "per_device_train_batch_size": "micro_batch_size", "micro_batch": "micro_batch_size",
               "batch_size": "global_batch_size", "lora_r": "rank", "r": "rank", "lora_alpha": "alpha",
               "lora_dropout": "dropout", "target_modules": "targets", "max_seq_length": "seq_len",
               "max_length": "seq_len", "tensor_parallel": "tp", "pipeline_parallel": "pp"}


def build_dataclass(cls: type, data: Any, source: str = "") -> Any:
    """`cls` (a dataclass tree) from a mapping; ConfigError naming every unknown key or bad
    type (and `source`, the file) at once. For configs other than the training Config."""
    problems: list[str] = []
    built = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return built


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Construct dataclass `cls` from a mapping, recording unknown keys and type errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            alias = KEY_ALIASES.get(str(key))
            close = ([alias] if alias and alias.split(".")[0] in names
                     else difflib.get_close_matches(str(key), names, n=1, cutoff=0.5))
            hint = (f"did you mean '{f'{path}.{close[0]}' if path else close[0]}'?" if close
                    else f"valid keys: {', '.join(names)}")
            problems.append(f"{dotted}: unknown key; {hint}")
            continue
        kwargs[key] = _convert(hints[key], value, dotted, problems)
    return cls(**kwargs)


# --------------------------------------------------------------------------- YAML, overrides


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file raises ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {type(data).__name__}"])
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` with `override` merged in recursively (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML). List items are addressed by index
    or, for lists of mappings with a `name`, by that name (`stages.dacpt.train.steps=5`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=10"])
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, key)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict):
                raise ConfigError([f"--set {key}: {'.'.join(parts[:i])} is not a mapping"])
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return int(part)
    for index, entry in enumerate(node):
        if isinstance(entry, dict) and entry.get("name") == part:
            return index
    names = [str(e.get("name")) for e in node if isinstance(e, dict) and "name" in e]
    raise ConfigError([f"--set {key}: no list item {part!r}; use an index 0..{len(node) - 1}"
                       + (f" or one of the names {names}" if names else "")])


# the fields that must equal a checkpoint's for its weights to mean the same model
CHECKPOINT_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                           "head_dim", "qkv_bias", "tie_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps")


def stored_model_config(init_from: str) -> tuple[dict, str] | None:
    """The `model:` mapping a checkpoint, run directory or `hf:` folder was made with, and the
    file it was read from (a checkpoint's model.yaml from an import, else its run's
    config.json); None when there is nothing to read."""
    if init_from.startswith("hf:"):
        folder = Path(init_from[len("hf:"):])
        if not (folder / "config.json").is_file():
            return None
        from megatron_domain.models.hf import model_config_dict, model_config_from_hf, read_hf_config

        return model_config_dict(model_config_from_hf(read_hf_config(folder), str(folder / "config.json"))), \
            str(folder / "config.json")
    path = Path(init_from)
    if not (path / "extra.json").is_file():
        pointer = path / "checkpoints" / "latest"
        if not pointer.is_file():
            return None
        path = path / "checkpoints" / pointer.read_text().strip()
    if (path / "model.yaml").is_file():
        return load_yaml(path / "model.yaml"), str(path / "model.yaml")
    run_config = path.parent.parent / "config.json"
    if not run_config.is_file():
        return None
    import json

    model = json.loads(run_config.read_text()).get("model") or {}
    return {k: v for k, v in model.items() if k not in ("preset", "init_from", "attention_backend")}, str(run_config)


# settings a resumed run must share with the checkpoint's run: the data stream it continues
# (blend, files, seed, row length), the random streams, the stage, and the adapter layout
RESUME_FIELDS = ("mode", "data.corpora", "data.chat.path", "data.seed", "data.seq_len", "train.seed",
                 "lora.rank", "lora.targets")


def resume_differences(saved: dict, current: dict) -> list[str]:
    """The RESUME_FIELDS on which two resolved configs (to_dict form) differ, as
    'key: <saved> in the checkpoint's run, <current> now'."""
    def get(tree: dict, dotted: str):
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    return [f"{key}: {get(saved, key)!r} in the checkpoint's run, {get(current, key)!r} now"
            for key in RESUME_FIELDS if get(saved, key) != get(current, key)]


def model_config_differences(model: ModelConfig, init_from: str) -> list[str]:
    """'model.<field>: <ours> here but <theirs> in <file>' for every CHECKPOINT_MODEL_FIELDS
    entry where `model` differs from the config `init_from` was written with."""
    stored = stored_model_config(init_from)
    if stored is None:
        return []
    data, source = stored
    problems: list[str] = []
    theirs = _build(ModelConfig, dict(data), "model", problems)
    differences = []
    for key in CHECKPOINT_MODEL_FIELDS:
        ours_value, their_value = getattr(model, key), getattr(theirs, key)
        if key == "head_dim":
            ours_value, their_value = model.resolved_head_dim, theirs.resolved_head_dim
        if ours_value != their_value:
            differences.append(f"model.{key}: {ours_value!r} here but {their_value!r} in {source}")
    return differences


def resolve_model_preset(model: dict, path: str, problems: list[str]) -> dict:
    """Overlay the user's model keys on the preset named by `model.preset`; without a preset,
    on the model config of `model.init_from` (a checkpoint, run or hf: folder)."""
    preset = model.get("preset")
    if not preset:
        init_from = str(model.get("init_from") or "")
        if not init_from:
            return model
        stored = stored_model_config(init_from)
        if stored is None:
            problems.append(f"{path}.init_from: {init_from} holds no model config (no checkpoint with a model.yaml or "
                            "a run config.json, no HF config.json); without model.preset the model config is read "
                            "from there. Check the path, or set model.preset")
            return model
        return deep_merge(stored[0], model)
    candidate = Path(str(preset))
    preset_file = candidate if candidate.suffix in (".yaml", ".yml") else MODEL_PRESET_DIR / f"{preset}.yaml"
    if not preset_file.is_file():
        known = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(str(preset), known, n=1)
        problems.append(f"{path}.preset: unknown preset {preset!r}; "
                        + (f"did you mean '{close[0]}'? " if close else "")
                        + f"known presets: {', '.join(known)}")
        return model
    base = load_yaml(preset_file)
    return deep_merge(base, model)


def config_from_dict(data: dict, source: str = "", path: str = "") -> Config:
    """Build and validate a `Config`; raises ConfigError listing every problem."""
    problems: list[str] = []
    data = dict(data)
    if isinstance(data.get("model"), dict):
        data["model"] = resolve_model_preset(data["model"], _join(path, "model"), problems)
    cfg = _build(Config, data, path, problems)
    # a run's saved config.json lists data.chat with its defaults (possibly an older release's
    # fields): only a value other than a default counts as set
    if isinstance(data.get("data"), dict) and "chat" in data["data"] and cfg.data.chat != ChatDataConfig() \
            and cfg.mode not in CHAT_MODES:
        problems.append(f"{_join(path, 'data.chat')}: set, but mode {cfg.mode!r} reads no conversations and would "
                        f"ignore it; remove data.chat or use a chat mode ({', '.join(CHAT_MODES)})")
    problems.extend(validate(cfg, path))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a run config from YAML and apply `--set` overrides."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return config_from_dict(data, source=str(path))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --------------------------------------------------------------------------- validation


def validate_kernels(k: KernelsConfig, prefix: str) -> list[str]:
    """Each kernels.<op> names `auto` or an implementation in the op table."""
    problems = []
    for op, backends in KERNEL_IMPLEMENTATIONS.items():
        choice = getattr(k, op)
        if choice != "auto" and choice not in backends:
            problems.append(f"{_join(prefix, op)}: unknown {choice!r}; choose auto or one of {', '.join(backends)}")
    if k.fused_cross_entropy not in (True, False, "auto"):
        problems.append(f"{_join(prefix, 'fused_cross_entropy')}: expected true, false or auto, got {k.fused_cross_entropy!r}")
    if k.fused_cross_entropy is True and k.linear_logprobs == "reference":
        problems.append(f"{_join(prefix, 'fused_cross_entropy')}: needs kernels.linear_logprobs chunked, triton "
                        "or auto (the reference materializes the logits)")
    if k.logprob_chunk_rows < 0:
        problems.append(f"{_join(prefix, 'logprob_chunk_rows')}: must be >= 0 (0 = automatic), got {k.logprob_chunk_rows}")
    return problems


def fused_cross_entropy_enabled(cfg: Config) -> bool:
    """kernels.fused_cross_entropy resolved: `auto` is on unless parallel.pp > 1 or
    kernels.linear_logprobs is the reference. Measured on a CPU with AMX (bench-20m, 4 x 512,
    eager, one run each): the fused path is 1.09x (fp32) and 1.12x (bf16) the logits path's
    tokens/s, at 1.55 vs 1.72 and 1.31 vs 1.44 GB peak memory."""
    if cfg.kernels.fused_cross_entropy == "auto":
        return cfg.parallel.pp == 1 and cfg.kernels.linear_logprobs != "reference"
    return bool(cfg.kernels.fused_cross_entropy)


def validate_fp8(cfg: Config, prefix: str) -> list[str]:
    """fp8.backend/recipe are known and combine with the rest of the run."""
    f, p = cfg.fp8, lambda key: _join(prefix, f"fp8.{key}")
    if f.backend not in FP8_RECIPES:
        return [f"{p('backend')}: unknown {f.backend!r}; choose none, float8 (torchao) or te (Transformer Engine)"]
    problems = []
    if f.recipe and f.recipe not in FP8_RECIPES[f.backend]:
        problems.append(f"{p('recipe')}: {f.recipe!r} is not a {f.backend} recipe; choose one of "
                        f"{', '.join(r for r in FP8_RECIPES[f.backend] if r)}")
    if f.backend != "none" and cfg.lora.rank > 0:
        problems.append(f"{p('backend')}: FP8 linears with LoRA adapters are not supported; set fp8.backend: none "
                        "for LoRA runs (QLoRA already stores the base in 4 bits)")
    if f.backend == "te" and cfg.parallel.tp > 1:
        problems.append(f"{p('backend')}: te runs with parallel.tp=1 (TE's own tensor parallelism is not wired); "
                        "use fp8.backend: float8 with tensor parallelism")
    return problems


def validate(cfg: Config, prefix: str = "") -> list[str]:
    """Semantic checks across the tree; returns problems as 'dotted.path: what and the fix'."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    problems: list[str] = []
    m, d, o, t, e = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.eval
    if cfg.mode not in MODES:
        problems.append(f"{p('mode')}: unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    problems.extend(validate_model(m, _join(prefix, "model")))
    differences = model_config_differences(m, m.init_from) if m.init_from else []
    if differences:
        problems.append(f"{p('model.init_from')}: {m.init_from} was trained with another model config: "
                        f"{'; '.join(differences)}. Leave out model.preset (the model config is then read from "
                        "there) or make these keys match")
    if e.dialogues.seeds:
        problems.extend(validate_dialogue_eval(e.dialogues, _join(prefix, "eval.dialogues")))
    problems.extend(validate_suites(e.suites, _join(prefix, "eval.suites")))
    for i, pattern in enumerate(e.generation.refusal_patterns):
        try:
            re.compile(pattern)
        except re.error as err:
            problems.append(f"{p(f'eval.generation.refusal_patterns[{i}]')}: {pattern!r} is not a regular "
                            f"expression ({err})")
    if d.seq_len <= 0:
        problems.append(f"{p('data.seq_len')}: must be > 0, got {d.seq_len}")
    elif m.max_seq_len > 0 and d.seq_len > m.max_seq_len:
        problems.append(f"{p('data.seq_len')}: {d.seq_len} exceeds model.max_seq_len ({m.max_seq_len}); "
                        "lower data.seq_len or raise model.max_seq_len")
    if e.seq_len > 0 and m.max_seq_len > 0 and e.seq_len > m.max_seq_len:
        problems.append(f"{p('eval.seq_len')}: {e.seq_len} exceeds model.max_seq_len ({m.max_seq_len})")
    if not 0.0 <= d.chat.replay < 1.0:
        problems.append(f"{p('data.chat.replay')}: must be in [0, 1), got {d.chat.replay}")
    elif d.chat.replay > 0 and not d.corpora:
        problems.append(f"{p('data.chat.replay')}: {d.chat.replay} needs data.corpora (the raw text to replay)")
    elif d.chat.replay > 0 and cfg.mode not in ("sft", "rs_sft"):
        problems.append(f"{p('data.chat.replay')}: only the sft and rs_sft modes replay raw text, not {cfg.mode!r}")
    if not d.chat.replay_loss_weight > 0:
        problems.append(f"{p('data.chat.replay_loss_weight')}: must be > 0, got {d.chat.replay_loss_weight}")
    elif d.chat.replay_loss_weight != 1.0 and d.chat.replay > 0 and cfg.parallel.pp > 1:
        problems.append(f"{p('data.chat.replay_loss_weight')}: {d.chat.replay_loss_weight} is not available with "
                        "parallel.pp > 1 (the pipeline loss has no per-token weights); use 1.0 or parallel.pp=1")
    for i, corpus in enumerate(d.corpora):
        if not corpus.path:
            problems.append(f"{p(f'data.corpora[{i}].path')}: empty; give an indexed dataset prefix "
                            "(the path without .bin/.idx), e.g. from `mdt data preprocess`")
        if corpus.weight <= 0:
            problems.append(f"{p(f'data.corpora[{i}].weight')}: must be > 0, got {corpus.weight}")
    for i, s in enumerate(e.sets):
        if not s.name or not s.path:
            problems.append(f"{p(f'eval.sets[{i}]')}: needs both name and path, got name={s.name!r} path={s.path!r}")
    names = [s.name for s in e.sets]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{p('eval.sets')}: the name {dup!r} is used twice; eval set names must be unique")
    if o.lr <= 0:
        problems.append(f"{p('optim.lr')}: must be > 0, got {o.lr}")
    if o.min_lr < 0 or o.min_lr > o.lr:
        problems.append(f"{p('optim.min_lr')}: must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if o.warmup_steps < 0:
        problems.append(f"{p('optim.warmup_steps')}: must be >= 0, got {o.warmup_steps}")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        problems.append(f"{p('optim.beta1')}/{p('optim.beta2')}: must be in [0, 1), got {o.beta1}, {o.beta2}")
    if o.clip_grad < 0:
        problems.append(f"{p('optim.clip_grad')}: must be >= 0 (0 disables clipping), got {o.clip_grad}")
    if o.implementation not in ("auto", "fused", "foreach"):
        problems.append(f"{p('optim.implementation')}: unknown {o.implementation!r}; choose auto, fused or foreach")
    if t.steps < 0 or (t.steps == 0 and cfg.mode != "rs_sft"):
        problems.append(f"{p('train.steps')}: must be > 0, got {t.steps}"
                        + (" (0 is rs_sft's 'rs_sft.epochs over the kept dialogues')" if t.steps == 0 else ""))
    if t.micro_batch_size <= 0:
        problems.append(f"{p('train.micro_batch_size')}: must be > 0, got {t.micro_batch_size}")
    elif t.global_batch_size % t.micro_batch_size:
        problems.append(f"{p('train.global_batch_size')}: {t.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size ({t.micro_batch_size}); make it micro x accumulation steps")
    if t.dtype not in DTYPES:
        problems.append(f"{p('train.dtype')}: unknown {t.dtype!r}; choose one of {', '.join(DTYPES)}")
    if t.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        problems.append(f"{p('train.activation_checkpointing')}: unknown {t.activation_checkpointing!r}; "
                        f"choose one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append(f"{p('train.device')}: unknown {t.device!r}; choose auto, cpu or cuda")
    if t.exit_at_step < 0 or (t.steps and t.exit_at_step > t.steps):
        problems.append(f"{p('train.exit_at_step')}: must be in [0, train.steps={t.steps}], got {t.exit_at_step}")
    if t.checkpoint_every < 0 or t.log_every <= 0:
        problems.append(f"{p('train.checkpoint_every')}/{p('train.log_every')}: need checkpoint_every >= 0 "
                        f"and log_every > 0, got {t.checkpoint_every}, {t.log_every}")
    if t.checkpoint_every_minutes < 0 or t.keep_last_checkpoints < 0 or t.hang_timeout_s < 0:
        problems.append(f"{p('train.checkpoint_every_minutes')}/{p('train.keep_last_checkpoints')}/"
                        f"{p('train.hang_timeout_s')}: must be >= 0 (0 = off / keep all), got "
                        f"{t.checkpoint_every_minutes}, {t.keep_last_checkpoints}, {t.hang_timeout_s}")
    for name in t.preempt_signals:
        if name not in PREEMPT_SIGNALS:
            problems.append(f"{p('train.preempt_signals')}: unknown signal {name!r}; choose from "
                            f"{', '.join(PREEMPT_SIGNALS)} (or [] to exit at once on a signal)")
    if cfg.tracking.wandb not in ("", "online", "offline"):
        problems.append(f"{p('tracking.wandb')}: unknown {cfg.tracking.wandb!r}; choose online, offline or leave it "
                        "empty (off)")
    problems.extend(validate_parallel(cfg, prefix))
    problems.extend(validate_lora(cfg, prefix))
    problems.extend(validate_kernels(cfg.kernels, _join(prefix, "kernels")))
    if cfg.kernels.fused_cross_entropy is True and cfg.parallel.pp > 1:
        problems.append(f"{p('kernels.fused_cross_entropy')}: not available with parallel.pp > 1 (the last pipeline "
                        "stage computes the loss from logits); set it to false")
    problems.extend(validate_fp8(cfg, prefix))
    problems.extend(validate_rollout(cfg.rollout, _join(prefix, "rollout")))
    if cfg.mode == "dpo":
        problems.extend(validate_dpo(cfg, prefix))
    if cfg.mode == "rs_sft":
        problems.extend(validate_rs_sft(cfg, prefix))
    if cfg.mode in CHAT_MODES:
        chat = cfg.data.chat
        if cfg.mode == "sft" and not chat.path:
            problems.append(f"{p('data.chat.path')}: the sft mode needs a JSONL file of conversations")
        if chat.template not in ("llama3", "chatml", "tokenizer"):
            problems.append(f"{p('data.chat.template')}: unknown {chat.template!r}; choose llama3, chatml or tokenizer")
        if chat.overflow not in ("truncate", "drop"):
            problems.append(f"{p('data.chat.overflow')}: unknown {chat.overflow!r}; choose truncate or drop")
    return problems


def validate_dpo(cfg: Config, prefix: str = "") -> list[str]:
    """Checks of the dpo section against the rest of the run."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    d, problems = cfg.dpo, []
    if d.loss_type not in DPO_LOSSES:
        problems.append(f"{p('dpo.loss_type')}: unknown {d.loss_type!r}; choose one of {', '.join(DPO_LOSSES)}")
    if d.beta <= 0:
        problems.append(f"{p('dpo.beta')}: must be > 0 (typical 0.01..0.3), got {d.beta}")
    if d.sft_weight < 0:
        problems.append(f"{p('dpo.sft_weight')}: must be >= 0 (0 = plain DPO), got {d.sft_weight}")
    if not 0 <= d.label_smoothing < 0.5:
        problems.append(f"{p('dpo.label_smoothing')}: must be in [0, 0.5), got {d.label_smoothing}")
    if d.reference not in DPO_REFERENCES:
        problems.append(f"{p('dpo.reference')}: unknown {d.reference!r}; choose one of {', '.join(DPO_REFERENCES)}")
    if d.reference == "adapters" and cfg.lora.rank == 0:
        problems.append(f"{p('dpo.reference')}: adapters needs LoRA (lora.rank > 0); use copy or precomputed")
    if d.shared_prompt and cfg.model.attention_backend not in ("sdpa", "flex"):
        problems.append(f"{p('dpo.shared_prompt')}: model.attention_backend={cfg.model.attention_backend} cannot "
                        "share a prompt between two completions; set dpo.shared_prompt: false or use sdpa/flex")
    if d.online:
        if cfg.parallel.pp > 1:
            problems.append(f"{p('parallel.pp')}: online DPO samples with the policy, which needs the whole model "
                            "on each rank; use parallel.pp=1 (tp and dp_shard work; offline DPO runs under pp)")
        if d.reference == "precomputed":
            problems.append(f"{p('dpo.reference')}: precomputed is for offline pairs (online pairs are new every "
                            "round); use adapters (LoRA) or copy")
        if not d.prompts:
            problems.append(f"{p('dpo.prompts')}: online DPO needs a JSONL file of prompts")
        if d.samples_per_prompt < 2:
            problems.append(f"{p('dpo.samples_per_prompt')}: needs >= 2 completions per prompt to form a pair, "
                            f"got {d.samples_per_prompt}")
        if min(d.rounds, d.prompts_per_round, d.steps_per_round) < 1:
            problems.append(f"{p('dpo.rounds')}/{p('dpo.prompts_per_round')}/{p('dpo.steps_per_round')}: must be "
                            f">= 1, got {d.rounds}, {d.prompts_per_round}, {d.steps_per_round}")
        elif cfg.train.steps != d.rounds * d.steps_per_round:
            problems.append(f"{p('train.steps')}: online DPO trains dpo.rounds x dpo.steps_per_round = "
                            f"{d.rounds * d.steps_per_round} steps, got {cfg.train.steps}; set train.steps to that")
        if d.min_score_margin < 0:
            problems.append(f"{p('dpo.min_score_margin')}: must be >= 0, got {d.min_score_margin}")
        for i, anchor in enumerate(d.anchors):
            if not isinstance(anchor, str) or not anchor.strip():
                problems.append(f"{p(f'dpo.anchors[{i}]')}: must be a non-empty completion text, got {anchor!r}")
        problems.extend(validate_judge(d.judge, _join(prefix, "dpo.judge")))
    else:
        if not cfg.data.chat.path:
            problems.append(f"{p('data.chat.path')}: offline DPO needs a JSONL file of preference pairs "
                            "(or set dpo.online: true)")
        if d.anchors:
            problems.append(f"{p('dpo.anchors')}: anchors are judged with online samples; offline pairs are fixed "
                            "(add the anchor to your pairs file, or set dpo.online: true)")
        if d.gold_field:
            problems.append(f"{p('dpo.gold_field')}: gold completions are judged with online samples; offline "
                            "pairs are fixed (make the gold answer a pair's chosen side, or set dpo.online: true)")
    if d.gold_against not in GOLD_AGAINST:
        problems.append(f"{p('dpo.gold_against')}: unknown {d.gold_against!r}; choose one of {', '.join(GOLD_AGAINST)}")
    return problems


def validate_rs_sft(cfg: Config, prefix: str = "") -> list[str]:
    """Checks of the rs_sft section against the rest of the run."""
    p = lambda key: _join(prefix, f"rs_sft.{key}")  # noqa: E731
    r, problems = cfg.rs_sft, []
    if not r.seeds:
        problems.append(f"{p('seeds')}: the rs_sft mode needs a JSONL file of seed dialogues")
    if r.dialogues_per_seed < 1 or r.turns < 1 or r.seeds_per_chunk < 1:
        problems.append(f"{p('dialogues_per_seed')}/{p('turns')}/{p('seeds_per_chunk')}: must be >= 1, got "
                        f"{r.dialogues_per_seed}, {r.turns}, {r.seeds_per_chunk}")
    if r.user_url and not (r.user_url.startswith(("http://", "https://")) and r.user_model):
        problems.append(f"{p('user_url')}: needs http(s)://host:port and rs_sft.user_model (the served model name); "
                        f"got {r.user_url!r}, {r.user_model!r}")
    if not 0 < r.keep_fraction <= 1:
        problems.append(f"{p('keep_fraction')}: must be in (0, 1] (the recipe keeps 0.2-0.3), got {r.keep_fraction}")
    if r.keep_per not in KEEP_PER:
        problems.append(f"{p('keep_per')}: unknown {r.keep_per!r}; choose one of {', '.join(KEEP_PER)}")
    if not 0 <= r.min_score <= 100:
        problems.append(f"{p('min_score')}: a dialogue score is in [0, 100], got {r.min_score}")
    if not 0 < r.dedup_similarity <= 1:
        problems.append(f"{p('dedup_similarity')}: must be in (0, 1] (1 drops exact duplicates only), "
                        f"got {r.dedup_similarity}")
    if r.epochs <= 0:
        problems.append(f"{p('epochs')}: must be > 0, got {r.epochs}")
    if r.rounds < 1:
        problems.append(f"{p('rounds')}: must be >= 1 (generate -> judge -> keep -> train, repeated), got {r.rounds}")
    elif cfg.train.steps % r.rounds:
        problems.append(f"{_join(prefix, 'train.steps')}: {cfg.train.steps} steps do not split into "
                        f"rs_sft.rounds={r.rounds} equal rounds; use a multiple of {r.rounds}, or 0 (rs_sft.epochs "
                        "over round 0's kept rows, per round)")
    if r.train_on not in ("all", "passing"):
        problems.append(f"{p('train_on')}: unknown {r.train_on!r}; choose all or passing")
    elif r.train_on == "passing" and r.judge.kind != "rubric":
        problems.append(f"{p('train_on')}: passing needs per-turn scores, which only a rubric judge gives")
    if r.gold_field and r.judge.kind != "rubric":
        problems.append(f"{p('gold_field')}: gold corrections replace the turns a judge failed, and only a rubric "
                        f"judge scores turns; use rs_sft.judge.kind: rubric or unset gold_field")
    if r.replay_fraction < 0 or (r.replay_fraction > 0) != bool(r.replay):
        problems.append(f"{p('replay')}/{p('replay_fraction')}: set both (a chat JSONL and replayed conversations per "
                        f"kept dialogue, > 0) or neither; got {r.replay!r}, {r.replay_fraction}")
    c = r.collapse
    if not (0 <= c.min_distinct_2 <= 1 and 0 <= c.max_top_opening_share <= 1 and 0 <= c.max_self_similarity <= 1):
        problems.append(f"{p('collapse')}: thresholds are shares in [0, 1], got min_distinct_2={c.min_distinct_2}, "
                        f"max_top_opening_share={c.max_top_opening_share}, max_self_similarity={c.max_self_similarity}")
    if cfg.parallel.pp > 1:
        problems.append(f"{_join(prefix, 'parallel.pp')}: rs_sft generates with the policy, which needs the whole "
                        "model on each rank; use parallel.pp=1 (tp and dp_shard work)")
    problems.extend(validate_judge(r.judge, p("judge")))
    return problems


def validate_suites(suites: list[EvalSuiteConfig], prefix: str) -> list[str]:
    """Names unique and set, tasks listed, numbers in range."""
    problems, seen = [], set()
    for i, suite in enumerate(suites):
        where = f"{prefix}[{suite.name or i}]"
        if not suite.name:
            problems.append(f"{prefix}[{i}].name: every suite needs a name (used by `mdt eval --suite NAME`)")
        elif suite.name in seen:
            problems.append(f"{where}.name: the name {suite.name!r} is used twice")
        seen.add(suite.name)
        if not suite.tasks:
            problems.append(f"{where}.tasks: list at least one lm-eval task")
        if suite.num_fewshot < -1:
            problems.append(f"{where}.num_fewshot: {suite.num_fewshot}; use -1 (the task's default) or >= 0")
        for key in ("limit", "max_length"):
            if getattr(suite, key) < 0:
                problems.append(f"{where}.{key}: must be >= 0 (0 = all / the model's), got {getattr(suite, key)}")
        if suite.batch_size < 1:
            problems.append(f"{where}.batch_size: must be >= 1, got {suite.batch_size}")
    return problems


def validate_dialogue_eval(dialogues: DialogueEvalConfig, prefix: str) -> list[str]:
    """Checks of eval.dialogues (when its seeds are set)."""
    problems = []
    if min(dialogues.turns, dialogues.late_turn, dialogues.max_new_tokens) < 1:
        problems.append(f"{prefix}.turns/late_turn/max_new_tokens: must be >= 1, got {dialogues.turns}, "
                        f"{dialogues.late_turn}, {dialogues.max_new_tokens}")
    if dialogues.template not in ("llama3", "chatml", "tokenizer"):
        problems.append(f"{prefix}.template: unknown {dialogues.template!r}; choose llama3, chatml or tokenizer")
    if dialogues.judge.kind != "rubric":
        problems.append(f"{prefix}.judge.kind: the dialogue eval scores turn by turn with a rubric; got "
                        f"{dialogues.judge.kind!r}")
    return problems + validate_judge(dialogues.judge, f"{prefix}.judge")


def validate_judge(j: JudgeConfig, prefix: str) -> list[str]:
    """Checks of a judge section (members of a panel are checked when the panel is built)."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    problems = []
    if j.kind not in JUDGE_KINDS:
        problems.append(f"{p('kind')}: unknown {j.kind!r}; choose one of {', '.join(JUDGE_KINDS)}")
    if j.kind == "rubric":
        if not j.rules:
            problems.append(f"{p('rules')}: a rubric judge needs at least one rule (pattern or function)")
        for i, rule in enumerate(j.rules):
            if bool(rule.pattern) == bool(rule.function):
                problems.append(f"{p(f'rules[{i}]')}: give exactly one of pattern or function")
            if rule.function and ":" not in rule.function:
                problems.append(f"{p(f'rules[{i}].function')}: expected module:function, got {rule.function!r}")
    if j.kind == "pairwise":
        if j.backend not in PAIRWISE_BACKENDS:
            problems.append(f"{p('backend')}: unknown {j.backend!r}; choose one of {', '.join(PAIRWISE_BACKENDS)}")
        if not j.model:
            problems.append(f"{p('model')}: the pairwise judge needs a model (a checkpoint or HF folder for "
                            "backend model, the served model name for backend openai)")
        if j.backend == "openai" and not j.url.startswith(("http://", "https://")):
            problems.append(f"{p('url')}: backend openai needs the endpoint, e.g. http://127.0.0.1:8000; "
                            f"got {j.url!r}")
        if j.timeout_s <= 0 or j.retries < 0 or j.max_concurrency < 1:
            problems.append(f"{p('timeout_s')}/{p('retries')}/{p('max_concurrency')}: need > 0, >= 0, >= 1; got "
                            f"{j.timeout_s}, {j.retries}, {j.max_concurrency}")
    if j.kind == "panel":
        if len(j.members) < 2:
            problems.append(f"{p('members')}: a panel needs at least two judges")
        if j.vote not in PANEL_VOTES:
            problems.append(f"{p('vote')}: unknown {j.vote!r}; choose one of {', '.join(PANEL_VOTES)}")
        for i, member in enumerate(j.members):
            member = {k: v for k, v in member.items() if k != "name"} if isinstance(member, dict) else member
            try:
                judge_from_dict(member, p(f"members[{i}]"))
            except ConfigError as exc:
                problems.extend(exc.problems)
    return problems


def judge_from_dict(data: dict, path: str) -> JudgeConfig:
    """A panel member's JudgeConfig from its mapping (an optional `name` labels it in
    rationales); problems raise ConfigError naming `path`."""
    problems: list[str] = []
    data = {k: v for k, v in data.items() if k != "name"} if isinstance(data, dict) else data
    judge = _build(JudgeConfig, data, path, problems)
    problems.extend(validate_judge(judge, path))
    if problems:
        raise ConfigError(problems)
    return judge


def sampling_problems(max_new_tokens: int, temperature: float, top_p: float, top_k: int, n: int) -> list[tuple[str, str]]:
    """(field, what is wrong) for sampling settings (the rollout section and every request)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(("max_new_tokens", f"must be >= 1, got {max_new_tokens}"))
    if temperature < 0:
        problems.append(("temperature", f"must be >= 0 (0 = greedy), got {temperature}"))
    if not 0 < top_p <= 1:
        problems.append(("top_p", f"must be in (0, 1], got {top_p}"))
    if top_k < 0:
        problems.append(("top_k", f"must be >= 0 (0 = off), got {top_k}"))
    if n < 1:
        problems.append(("n", f"must be >= 1, got {n}"))
    elif temperature == 0 and n > 1:
        problems.append(("n", f"is {n}, but with temperature 0 (greedy) every sample is the same answer; "
                               "use temperature > 0"))
    return problems


def validate_rollout(r: RolloutConfig, prefix: str) -> list[str]:
    """Checks of the `rollout` section."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    problems: list[str] = []
    if r.backend not in ROLLOUT_BACKENDS:
        problems.append(f"{p('backend')}: unknown {r.backend!r}; choose one of {', '.join(ROLLOUT_BACKENDS)}")
    if r.urls and r.backend != "vllm":
        problems.append(f"{p('urls')}: servers are used by the vllm backend; set rollout.backend: vllm or remove "
                        "rollout.urls")
    for i, url in enumerate(r.urls):
        if not str(url).startswith(("http://", "https://")):
            problems.append(f"{p(f'urls[{i}]')}: {url!r} is not an http(s) URL, e.g. http://10.0.0.5:8000")
    problems.extend(f"{p(key)}: {message}" for key, message in sampling_problems(
        r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.n))
    if r.max_batch_sequences < 1:
        problems.append(f"{p('max_batch_sequences')}: must be >= 1, got {r.max_batch_sequences}")
    if r.sync_timeout_s <= 0 or r.request_timeout_s <= 0:
        problems.append(f"{p('sync_timeout_s')}/{p('request_timeout_s')}: must be > 0, got {r.sync_timeout_s}, "
                        f"{r.request_timeout_s}")
    if r.probe_sequences < 0 or r.probe_tolerance < 0:
        problems.append(f"{p('probe_sequences')}/{p('probe_tolerance')}: must be >= 0 (probe_sequences 0 = no "
                        f"probe), got {r.probe_sequences}, {r.probe_tolerance}")
    v = r.vllm
    if v.dtype not in VLLM_DTYPES:
        problems.append(f"{p('vllm.dtype')}: unknown {v.dtype!r}; choose one of {', '.join(VLLM_DTYPES)}")
    if v.max_loras < 1 or v.tensor_parallel_size < 1:
        problems.append(f"{p('vllm.max_loras')}/{p('vllm.tensor_parallel_size')}: must be >= 1, got {v.max_loras}, "
                        f"{v.tensor_parallel_size}")
    if not 0 < v.gpu_memory_utilization <= 1 or v.kv_cache_gb < 0:
        problems.append(f"{p('vllm.gpu_memory_utilization')}/{p('vllm.kv_cache_gb')}: need a fraction in (0, 1] and "
                        f"GB >= 0, got {v.gpu_memory_utilization}, {v.kv_cache_gb}")
    return problems


def validate_lora(cfg: Config, prefix: str = "") -> list[str]:
    """Checks of the `lora` section."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    lo = cfg.lora
    problems: list[str] = []
    if lo.rank < 0:
        problems.append(f"{p('lora.rank')}: must be >= 0 (0 = no LoRA), got {lo.rank}")
    if not 0 <= lo.dropout < 1:
        problems.append(f"{p('lora.dropout')}: must be in [0, 1), got {lo.dropout}")
    unknown = [t for t in lo.targets if t not in LORA_TARGETS]
    if unknown or not lo.targets:
        problems.append(f"{p('lora.targets')}: {unknown or 'empty'}; choose from {', '.join(LORA_TARGETS)}")
    if lo.quantize_base not in QUANTIZE_BASE:
        problems.append(f"{p('lora.quantize_base')}: unknown {lo.quantize_base!r}; choose one of "
                        f"{', '.join(QUANTIZE_BASE)}")
    elif lo.quantize_base != "none" and lo.rank == 0:
        problems.append(f"{p('lora.quantize_base')}: {lo.quantize_base} quantizes the frozen base for QLoRA; "
                        "it needs lora.rank > 0")
    return problems


def validate_model(m: ModelConfig, prefix: str = "model") -> list[str]:
    """Checks of the model section alone."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    problems: list[str] = []
    unread_init_from = bool(m.init_from and not m.preset and stored_model_config(m.init_from) is None)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(m, key) <= 0 and not unread_init_from:  # that init_from is reported instead
            problems.append(f"{p(key)}: must be > 0, got {getattr(m, key)}; "
                            "set it or choose a model.preset")
    if m.num_heads > 0 and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        problems.append(f"{p('num_kv_heads')}: model.num_heads ({m.num_heads}) must be a multiple "
                        f"of model.num_kv_heads ({m.num_kv_heads})")
    if m.head_dim == 0 and m.num_heads > 0 and m.hidden_size % m.num_heads:
        problems.append(f"{p('hidden_size')}: {m.hidden_size} is not divisible by model.num_heads "
                        f"({m.num_heads}); set model.head_dim explicitly")
    if m.resolved_head_dim % 2:
        problems.append(f"{p('head_dim')}: RoPE needs an even head dimension, got {m.resolved_head_dim}")
    if m.rope_scaling.type not in ("none", "llama3"):
        problems.append(f"{p('rope_scaling.type')}: unknown {m.rope_scaling.type!r}; use none or llama3")
    if m.hf_architecture and m.hf_architecture not in HF_ARCHITECTURES:
        problems.append(f"{p('hf_architecture')}: unknown {m.hf_architecture!r}; choose one of "
                        f"{', '.join(HF_ARCHITECTURES)} (or leave empty)")
    if m.attention_backend not in ATTENTION_BACKENDS:
        problems.append(f"{p('attention_backend')}: unknown {m.attention_backend!r}; "
                        f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    return problems


def model_config_from_dict(data: dict, source: str = "") -> ModelConfig:
    """A validated ModelConfig from a `model:` mapping (presets resolved)."""
    problems: list[str] = []
    model = _build(ModelConfig, resolve_model_preset(dict(data), "model", problems), "model", problems)
    problems.extend(validate_model(model))
    if problems:
        raise ConfigError(problems, source)
    return model


def validate_parallel(cfg: Config, prefix: str = "") -> list[str]:
    """The checks of `parallel.*` that need no world size (ParallelDims checks the rest)."""
    p = lambda key: _join(prefix, key)  # noqa: E731
    par, m, d = cfg.parallel, cfg.model, cfg.data
    problems: list[str] = []
    degrees = {"tp": par.tp, "pp": par.pp, "dp_shard": par.dp_shard, "dp_replicate": par.dp_replicate}
    for key, value in degrees.items():
        if value == 0 or value < -1:
            problems.append(f"{p('parallel.' + key)}: must be >= 1, or -1 for the rest of the world size; got {value}")
    if sum(v == -1 for v in degrees.values()) > 1:
        problems.append(f"{p('parallel')}: at most one degree may be -1, got "
                        + ", ".join(f"{k}={v}" for k, v in degrees.items() if v == -1))
    if par.tp > 1:
        for key in ("num_heads", "num_kv_heads", "vocab_size", "intermediate_size"):
            value = getattr(m, key)
            if value > 0 and value % par.tp:
                problems.append(f"{p('parallel.tp')}: model.{key} ({value}) must be divisible by parallel.tp "
                                f"({par.tp}); choose a tp that divides it")
        if par.sequence_parallel and d.seq_len % par.tp:
            problems.append(f"{p('parallel.sequence_parallel')}: data.seq_len ({d.seq_len}) must be divisible by "
                            f"parallel.tp ({par.tp}); change seq_len or set parallel.sequence_parallel=false")
    if par.pp_schedule not in PIPELINE_SCHEDULES:
        problems.append(f"{p('parallel.pp_schedule')}: unknown {par.pp_schedule!r}; choose one of "
                        f"{', '.join(PIPELINE_SCHEDULES)}")
    if par.pp_virtual_stages < 1:
        problems.append(f"{p('parallel.pp_virtual_stages')}: must be >= 1, got {par.pp_virtual_stages}")
    elif par.pp > 1 or par.pp == -1:
        multi = par.pp_schedule in MULTI_STAGE_SCHEDULES
        if multi and par.pp_virtual_stages < 2:
            problems.append(f"{p('parallel.pp_virtual_stages')}: schedule {par.pp_schedule} needs >= 2 virtual "
                            f"stages per rank, got {par.pp_virtual_stages}")
        if par.pp_schedule == "zbv_zero_bubble" and par.pp_virtual_stages != 2:
            problems.append(f"{p('parallel.pp_virtual_stages')}: zbv_zero_bubble runs exactly 2 stages per rank "
                            f"(V shape), got {par.pp_virtual_stages}")
        if not multi and par.pp_virtual_stages != 1:
            problems.append(f"{p('parallel.pp_schedule')}: {par.pp_schedule} runs one stage per rank but "
                            f"parallel.pp_virtual_stages={par.pp_virtual_stages}; use interleaved_1f1b")
        if m.tie_embeddings:
            problems.append(f"{p('parallel.pp')}: tied embeddings (model.tie_embeddings=true) would be split "
                            "across the first and last pipeline stage; untie them or use parallel.pp=1")
    if par.pp > 0:
        stages = par.pp * max(par.pp_virtual_stages, 1)
        if par.pp_layers:
            if len(par.pp_layers) != stages or any(n < 1 for n in par.pp_layers):
                problems.append(f"{p('parallel.pp_layers')}: needs {stages} positive entries (pp {par.pp} x "
                                f"virtual {par.pp_virtual_stages}), got {par.pp_layers}")
            elif sum(par.pp_layers) != m.num_layers:
                problems.append(f"{p('parallel.pp_layers')}: sums to {sum(par.pp_layers)} but model.num_layers is "
                                f"{m.num_layers}")
        elif m.num_layers > 0 and m.num_layers < stages:
            problems.append(f"{p('parallel.pp')}: model.num_layers ({m.num_layers}) < pp x virtual stages "
                            f"({par.pp} x {par.pp_virtual_stages} = {stages}); every stage needs a layer")
    return problems


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, list[Config]]:
    """Load a pipeline and build every stage's `Config`; all problems of all stages at once."""
    data = apply_overrides(load_yaml(path), overrides or [])
    problems: list[str] = []
    if "checks" in data:
        data = {k: v for k, v in data.items() if k != "checks"}
        problems.append("checks: replaced by per-stage gates; move each entry under its stage as `gates: [{metric: "
                        "ppl/<set>, max_rise: 0.05}, {metric: citation_accuracy, min_gain: 0.15}, ...]` "
                        "(ppl max_change -> max_rise, min_after -> min)")
    pipe = _build(PipelineConfig, data, "", problems)
    if not pipe.stages:
        problems.append("stages: the pipeline has no stages; add at least one under `stages:`")
    stage_configs: list[Config] = []
    seen: set[str] = set()
    for i, stage in enumerate(pipe.stages):
        stage = dict(stage)
        stage.pop("gates", None)  # checked below, once the stage's config is built
        name = str(stage.pop("name", "") or "")
        where = f"stages[{name or i}]"
        if not name:
            problems.append(f"stages[{i}].name: every stage needs a unique name")
        elif name in seen:
            problems.append(f"{where}.name: the name {name!r} is used twice")
        seen.add(name)
        merged = substitute(deep_merge(pipe.defaults, stage), {"out_dir": pipe.out_dir, "stage": name})
        merged.setdefault("train", {})
        if isinstance(merged["train"], dict):
            merged["train"].setdefault("run_dir", str(Path(pipe.out_dir) / name))
        try:
            stage_configs.append(config_from_dict(merged, path=where))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if len(stage_configs) == len(pipe.stages):
        for name, cfg in zip(stage_names(pipe), stage_configs):
            problems.extend(validate_gates(stage_gates(pipe, name, problems), cfg, f"stages[{name}].gates"))
    if problems:
        raise ConfigError(problems, str(path))
    return pipe, stage_configs


def stage_gates(pipe: PipelineConfig, name: str, problems: list[str] | None = None) -> list[GateConfig]:
    """The `gates:` of stage `name` (type problems are appended to `problems`)."""
    problems = [] if problems is None else problems
    stage = next(s for s in pipe.stages if str(s.get("name")) == name)
    raw = stage.get("gates") or []
    return _convert(list[GateConfig], raw, f"stages[{name}].gates", problems)


def validate_gates(gates: list[GateConfig], cfg: Config, prefix: str) -> list[str]:
    """Each gate names a metric the stage measures and sets at least one bound."""
    problems = []
    sets = [s.name for s in cfg.eval.sets]
    tasks = [t for suite in cfg.eval.suites for t in suite.tasks]
    for i, gate in enumerate(gates):
        where, metric = f"{prefix}[{i}]", gate.metric
        if all(math.isnan(getattr(gate, b)) for b in GATE_BOUNDS):
            problems.append(f"{where}: no bound set; give one or more of {', '.join(GATE_BOUNDS)}")
        if metric.startswith("ppl/"):
            if metric[4:] not in sets:
                problems.append(f"{where}.metric: {metric!r}: {metric[4:]!r} is not an eval set of the stage "
                                f"({', '.join(sets) or 'none'})")
        elif metric in GENERATION_METRICS:
            if not cfg.eval.generation.path:
                problems.append(f"{where}.metric: {metric} needs eval.generation.path in the stage")
        elif metric in DIALOGUE_METRICS:
            if not cfg.eval.dialogues.seeds:
                problems.append(f"{where}.metric: {metric} needs eval.dialogues.seeds in the stage")
        elif "/" in metric:
            if metric.split("/", 1)[0] not in tasks:
                problems.append(f"{where}.metric: {metric!r}: no eval.suites entry of the stage runs task "
                                f"{metric.split('/', 1)[0]!r} (tasks: {', '.join(tasks) or 'none'})")
        else:
            problems.append(f"{where}.metric: unknown {metric!r}; use ppl/<set>, <task>/<metric> of an eval suite, "
                            f"or one of {', '.join(GENERATION_METRICS + DIALOGUE_METRICS)}")
    return problems


def stage_names(pipe: PipelineConfig) -> list[str]:
    """The stage names in run order."""
    return [str(s.get("name")) for s in pipe.stages]


def substitute(data: Any, values: dict[str, str]) -> Any:
    """Replace `{out_dir}`-style placeholders in every string of a nested structure."""
    if isinstance(data, dict):
        return {k: substitute(v, values) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, values) for v in data]
    if isinstance(data, str):
        for key, value in values.items():
            data = data.replace("{" + key + "}", str(value))
    return data


def to_dict(cfg: Any) -> dict:
    """A plain-dict copy of a config dataclass (for logs and checkpoints)."""
    return dataclasses.asdict(cfg)
