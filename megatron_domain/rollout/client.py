"""Client for OpenAI-compatible servers: vLLM's (`python -m vllm.entrypoints.openai.api_server`)
and ours (`mdt serve`). Rollouts, judges and the latency benchmark all talk to servers
through it.

Generation uses `/v1/completions` with the prompt as token ids (no re-tokenization on the
server, so a rollout's tokens are exactly the trainer's), `return_token_ids` and the log-prob
of every sampled token. Requests are spread round-robin over the configured servers and sent
concurrently. vLLM's administration endpoints used by the weight sync (`/collective_rpc`,
`/reset_prefix_cache`: server started with VLLM_SERVER_DEV_MODE=1; `/v1/load_lora_adapter`:
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) go to every server. Every call has a timeout and fails
with an error that names the server, the endpoint and what was being done.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import httpx

from megatron_domain.rollout.sampling import Completion, SamplingParams


class ServerError(RuntimeError):
    """A server did not answer in time, or answered with an error."""


class OpenAIClient:
    """Requests to one or more OpenAI-compatible servers (`urls` like http://host:8000)."""

    def __init__(self, urls: list[str], timeout_s: float = 600.0, max_concurrency: int = 32):
        if not urls:
            raise ValueError("rollout.urls: no server given")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_concurrency))
        self._next = itertools.cycle(range(len(self.urls)))

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def request(self, url: str, method: str, path: str, what: str, timeout_s: float | None = None,
                **kwargs) -> httpx.Response:
        """One HTTP call; timeouts and error statuses raise ServerError naming url, path and `what`."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            response = self.http.request(method, url + path, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerError(f"{what}: {url}{path} did not answer within {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise ServerError(f"{what}: {url}{path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise ServerError(f"{what}: {url}{path} answered {response.status_code}: {response.text[:500]}")
        return response

    def on_every_server(self, method: str, path: str, what: str, timeout_s: float | None = None,
                        **kwargs) -> list[httpx.Response]:
        """The same call to every server (e.g. a weight sync), concurrently."""
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = [pool.submit(self.request, url, method, path, what, timeout_s, **kwargs) for url in self.urls]
            return [f.result() for f in futures]

    def model_names(self, url: str | None = None) -> list[str]:
        """The model ids a server serves (`/v1/models`)."""
        response = self.request(url or self.urls[0], "GET", "/v1/models", "list models")
        return [m["id"] for m in response.json().get("data", [])]

    def complete_ids(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], model: str,
                     extra: dict | None = None) -> list[Completion]:
        """n completions of every token-id prompt (spread over the servers), in prompt order."""
        def one(index: int) -> list[Completion]:
            url = self.urls[next(self._next)]
            body = {"model": model, "prompt": prompts[index], "max_tokens": params.max_new_tokens, "n": params.n,
                    "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "seed": seeds[index], "stop": params.stop or None, "stop_token_ids": params.stop_token_ids,
                    "ignore_eos": params.ignore_stop, "logprobs": 0, "return_token_ids": True,
                    "skip_special_tokens": True, **(extra or {})}
            data = self.request(url, "POST", "/v1/completions", f"generate (prompt {index})", json=body).json()
            choices = sorted(data["choices"], key=lambda c: c["index"])
            return [Completion(prompt_index=index, sample_index=j, token_ids=list(c["token_ids"]), text=c["text"],
                               logprobs=[float(x) for x in c["logprobs"]["token_logprobs"]],
                               finish_reason="length" if c.get("finish_reason") == "length" else "stop")
                    for j, c in enumerate(choices)]

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(prompts)))) as pool:
            return [c for group in pool.map(one, range(len(prompts))) for c in group]
