"""Rank-side code of the multi-process kernel tests (importable by spawned processes)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_domain.kernels.linear_logprobs import linear_logprobs_chunked, linear_logprobs_reference


def vocab_parallel_logprobs(rank: int, out_dir: str) -> None:
    """Every rank holds half of the vocabulary rows (uneven split: 23 + 22); its chunked
    log-probs, entropy and gradients must equal the full-vocabulary reference (fp32)."""
    torch.manual_seed(0)
    hidden = torch.randn(19, 12)  # [N, H], same on every rank
    weight = torch.randn(45, 12)  # [V, H], full
    targets = torch.randint(0, 45, (19,))
    grad_lp, grad_ent = torch.randn(19), torch.randn(19)
    bounds = [(0, 23), (23, 45)][rank]

    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = linear_logprobs_reference(ref_hidden, ref_weight, targets, with_entropy=True)
    ((lp * grad_lp).sum() + (ent * grad_ent).sum()).backward()

    my_hidden = hidden.clone().requires_grad_()
    my_weight = weight[bounds[0]:bounds[1]].clone().requires_grad_()
    lp_tp, ent_tp = linear_logprobs_chunked(my_hidden, my_weight, targets, with_entropy=True,
                                            group=dist.group.WORLD, chunk_rows=5)
    ((lp_tp * grad_lp).sum() + (ent_tp * grad_ent).sum()).backward()
    errors = {"logp": (lp_tp - lp).abs().max().item(), "entropy": (ent_tp - ent).abs().max().item(),
              "grad_hidden": (my_hidden.grad - ref_hidden.grad).abs().max().item(),
              "grad_weight": (my_weight.grad - ref_weight.grad[bounds[0]:bounds[1]]).abs().max().item()}
    Path(out_dir, f"rank{rank}.txt").write_text(repr(errors))


def triton_interpreted_errors() -> dict:
    """Max errors of the Triton logprobs vs the reference, forward and gradients, at small
    shapes; run in a process started with TRITON_INTERPRET=1 (read when triton is imported)."""
    from megatron_domain.kernels.triton_logprobs import linear_logprobs_triton

    errors = {}
    for n, h, v, chunk, dtype in [(7, 8, 33, 3, torch.float32), (16, 16, 1500, 16, torch.float32),
                                  (9, 16, 130, 4, torch.bfloat16)]:
        for with_entropy in (False, True):
            g = torch.Generator().manual_seed(v)
            hidden = torch.randn(n, h, generator=g).to(dtype)
            weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
            targets = torch.randint(0, v, (n,), generator=g)
            g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
            results = []
            for fn, kwargs in ((linear_logprobs_reference, {}), (linear_logprobs_triton, {"chunk_rows": chunk})):
                hid, wei = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                lp, ent = fn(hid, wei, targets, with_entropy=with_entropy, **kwargs)
                ((lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)).backward()
                results.append([lp, hid.grad, wei.grad] + ([ent] if with_entropy else []))
            name = f"n{n}_v{v}_entropy{int(with_entropy)}_{str(dtype)[6:]}"
            errors[name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(*results))
    return errors
