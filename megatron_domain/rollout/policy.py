"""Generation from the current policy, whatever runs it (`rollout.backend`):

- `native`: our model itself, through the KV-cache sampler (the reference; no sync needed);
- `vllm` without `rollout.urls`: an in-process vLLM engine on the exported policy;
- `vllm` with `rollout.urls`: vLLM servers on other machines (requests spread over them).

`sync(model)` after every training round makes the engine serve the model's current weights:
full weights through vLLM's `reload_weights` (in-process: from memory; servers: from
`rollout.weights_dir`, a folder they can read), or, for LoRA runs, the adapter saved in PEFT's
format and loaded under a new name (the base never changes). Each sync is timed
(`rollout/refit_s`) and followed by a probe: the engine continues fixed prompts greedily and
the log-prob it reports for every token must equal the trainer's teacher-forced one within
`rollout.probe_tolerance`, else RolloutSyncError.

Under a parallel layout every rank calls every method (gathering the weights and the probe's
forward are collective); rank 0 alone talks to the engine and shares the results.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_domain.config import CHAT_MODES, Config
from megatron_domain.data.chat import load_template
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.rollout.client import OpenAIClient, ServerError
from megatron_domain.rollout.export import gathered_state_dict, hf_weights, write_hf_folder, write_peft_adapter
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.probe import completion_logprobs, max_abs_difference, probe_params, probe_sequences
from megatron_domain.rollout.prompts import stop_conditions
from megatron_domain.rollout.sampling import Completion, SamplingParams, sequence_seeds
from megatron_domain.rollout.vllm_engine import RolloutSyncError

def sampling_from_config(cfg: Config, tokenizer: TextTokenizer, chat: bool) -> SamplingParams:
    """The `rollout` section's sampling, stopping at the chat template's end of turn (chat
    prompts) and at the end of document."""
    r = cfg.rollout
    template = load_template(cfg.data.chat.template, tokenizer.source) if chat else None
    stop_ids, stop_strings = stop_conditions(template, tokenizer)
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          n=r.n, seed=r.seed, stop=stop_strings, stop_token_ids=stop_ids).validate()


def engine_dtype(cfg: Config) -> str:
    """The dtype the inference engine computes in: rollout.vllm.dtype, or the training dtype."""
    return cfg.train.dtype if cfg.rollout.vllm.dtype == "auto" else cfg.rollout.vllm.dtype


def probe_tolerance(cfg: Config) -> float:
    """Largest allowed per-token |log-prob difference| between engine and trainer."""
    if cfg.rollout.probe_tolerance > 0:
        return cfg.rollout.probe_tolerance
    return 2e-3 if engine_dtype(cfg) == "fp32" else 0.1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def on_rank0(fn: Callable):
    """fn() on rank 0; its result (or its error) reaches every rank."""
    result, error = None, None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised on every rank below
            error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if message is not None and error is None:
            raise RolloutSyncError(f"rank 0: {message}")
    if error is not None:
        raise error
    return result


class PolicyRollout:
    """Samples from the current policy with the configured backend (see the module docstring)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, tokenizer: TextTokenizer, run_dir: str | Path,
                 device: torch.device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.backend = cfg.rollout.backend if not cfg.rollout.urls else "vllm-server"
        self.model = model
        self.version = 0
        self.adapter = None  # the LoRA adapter the engine serves the policy with
        self.probe = probe_sequences(cfg.model.vocab_size, cfg.rollout.probe_sequences)
        self.weights_dir = Path(cfg.rollout.weights_dir or Path(run_dir) / "rollout_weights")
        self.engine = None
        self.client: OpenAIClient | None = None
        self.served_model = ""
        if self.backend == "native":
            self.native = NativeSampler.for_tokenizer(model, tokenizer, device, cfg.rollout.max_batch_sequences)
            return
        self.lora = cfg.lora.rank > 0
        self.base_dir = self.weights_dir / "policy"
        state = gathered_state_dict(model)
        if self.backend == "vllm":
            on_rank0(lambda: self._start_engine(state))
        else:
            self.client = OpenAIClient(cfg.rollout.urls, cfg.rollout.request_timeout_s)
            self.served_model = on_rank0(lambda: self.client.model_names()[0])
        self.sync(model, state)

    # ----------------------------------------------------------------- engine lifecycle

    def _template_name(self) -> str:
        return self.cfg.data.chat.template if self.cfg.mode in CHAT_MODES else ""

    def _start_engine(self, state: dict) -> None:
        from megatron_domain.rollout.vllm_engine import VllmEngine

        r, dtype = self.cfg.rollout, engine_dtype(self.cfg)
        write_hf_folder(self.base_dir, state, self.cfg.model, _torch_dtype(dtype), self.tokenizer.source,
                        self._template_name(), self.cfg.data.eod_token)
        self.engine = VllmEngine(str(self.base_dir), dtype, r.vllm.max_model_len or self.cfg.model.max_seq_len,
                                 r.seed, r.vllm.kv_cache_gb if self.device.type == "cpu" else 0.0,
                                 r.vllm.gpu_memory_utilization, r.vllm.enforce_eager, r.vllm.tensor_parallel_size,
                                 max_lora_rank=self.cfg.lora.rank, max_loras=r.vllm.max_loras,
                                 engine_args=r.vllm.engine_args)

    def close(self) -> None:
        """Stop the in-process engine / close server connections."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.client is not None:
            self.client.close()
            self.client = None

    # ----------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """n completions per token-id prompt from the current policy (prompt order). With vLLM
        `progress(new_tokens)` is called once per chunk of `rollout.max_batch_sequences`."""
        params.validate()
        seeds = sequence_seeds(params.seed, seeds, len(prompts))
        if self.backend == "native":
            return self.native.generate(prompts, params, seeds, progress)
        return on_rank0(lambda: self._engine_generate(prompts, params, seeds, progress))

    def _engine_generate(self, prompts, params, seeds, progress) -> list[Completion]:
        chunk = max(1, self.cfg.rollout.max_batch_sequences // params.n)
        out: list[Completion] = []
        for start in range(0, len(prompts), chunk):
            part, part_seeds = prompts[start:start + chunk], seeds[start:start + chunk]
            if self.engine is not None:
                done = self.engine.generate(part, params, part_seeds, [self.adapter] * len(part))
            else:
                done = self.client.complete_ids(part, params, part_seeds, self._model_name())
            for c in done:
                c.prompt_index += start
            out.extend(done)
            if progress is not None:
                progress(sum(len(c.token_ids) for c in done))
        return out

    def _model_name(self) -> str:
        return self.adapter.name if self.adapter is not None else self.served_model

    # ----------------------------------------------------------------- weight sync + probe

    def sync(self, model: torch.nn.Module | None = None, state: dict | None = None) -> dict:
        """Make the engine serve `model`'s current weights, then probe; returns
        {"rollout/refit_s", "rollout/probe_max_abs_diff"} (native: nothing to do, 0)."""
        model = model or self.model
        if self.backend == "native":
            return {"rollout/refit_s": 0.0, "rollout/probe_max_abs_diff": 0.0}
        started = time.perf_counter()
        state = gathered_state_dict(model) if state is None else state
        self.version += 1
        on_rank0(lambda: self._push(state))
        refit_s = time.perf_counter() - started
        return {"rollout/refit_s": refit_s, "rollout/probe_max_abs_diff": self._probe(model)}

    def _push(self, state: dict) -> None:
        timeout = self.cfg.rollout.sync_timeout_s
        if self.lora:
            path = write_peft_adapter(self.weights_dir / f"adapter_{self.version:05d}", state, self.cfg.lora,
                                      str(self.base_dir))
            previous = self.adapter
            if self.engine is not None:
                self.adapter = self.engine.add_adapter(str(path), timeout)
                if previous is not None:
                    self.engine.remove_adapter(previous)
            else:
                self.adapter = self._server_load_adapter(path, timeout)
                if previous is not None:
                    self.client.on_every_server("POST", "/v1/unload_lora_adapter", f"unloading adapter {previous.name}",
                                                timeout, json={"lora_name": previous.name})
            return
        weights = hf_weights(state, _torch_dtype(engine_dtype(self.cfg)))
        if self.engine is not None:
            from safetensors.torch import save

            self.engine.load_weights(save(weights), timeout)
            return
        from safetensors.torch import save_file

        folder = self.weights_dir / f"policy_{self.version:05d}"
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.replace(folder)
        what = f"weight sync: reload_weights from {folder}"
        try:
            self.client.on_every_server("POST", "/collective_rpc", what, timeout,
                                        json={"method": "reload_weights", "kwargs": {"weights_path": str(folder)},
                                              "timeout": timeout})
            self.client.on_every_server("POST", "/reset_prefix_cache", "weight sync: reset_prefix_cache", timeout)
        except ServerError as exc:
            raise RolloutSyncError(f"{exc} (servers need VLLM_SERVER_DEV_MODE=1 and read access to {folder})") from exc

    def _server_load_adapter(self, path: Path, timeout: float):
        from megatron_domain.rollout.vllm_engine import Adapter

        adapter = Adapter(f"policy-{self.version}", self.version, str(path))
        try:
            self.client.on_every_server("POST", "/v1/load_lora_adapter", f"weight sync: loading adapter {path}", timeout,
                                        json={"lora_name": adapter.name, "lora_path": str(path)})
        except ServerError as exc:
            raise RolloutSyncError(f"{exc} (servers need --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)") \
                from exc
        return adapter

    def _probe(self, model: torch.nn.Module) -> float:
        """Max |engine - trainer| log-prob of the engine's greedy continuations of the probe prompts."""
        if not self.probe:
            return 0.0
        seeds = list(range(len(self.probe)))
        completions = on_rank0(lambda: self._engine_generate(self.probe, probe_params(), seeds, None))
        tokens = [c.token_ids for c in completions]
        trainer = completion_logprobs(model, self.probe, tokens, self.device)
        diff = max_abs_difference(trainer, [c.logprobs for c in completions])
        tolerance = probe_tolerance(self.cfg)
        if not diff <= tolerance:
            raise RolloutSyncError(f"probe after weight sync {self.version} ({self.backend}): the engine's log-probs "
                                   f"differ from the trainer's by up to {diff:.3g} (> rollout.probe_tolerance "
                                   f"{tolerance:g}); it is not serving the current weights")
        return diff


def _torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
