"""`mode: sft`: supervised fine-tuning on conversations (full, LoRA or QLoRA: `lora.*` picks
what trains). The loss covers the assistant turns only (data/chat.py); conversations are packed
by best-fit-decreasing into rows of data.seq_len with per-conversation positions and
attention, so nothing crosses from one conversation into another.

Departures from the usual recipe: none in the objective; the rows are reshuffled every epoch
with a seeded permutation, and the cursor counts global rows, so resume is row-exact. With
`data.chat.replay` > 0 that share of every micro-batch's rows is raw text from `data.corpora`
(loss on every token), which keeps the base model's language modelling from eroding while it
learns the chat format (measured on the demo: README).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from megatron_domain.data.chat import (
    encode_conversation, load_template, pack_conversations, read_conversations, warn_if_markers_split)
from megatron_domain.stages import StageContext
from megatron_domain.stages.pretrain import corpus_stream
from megatron_domain.stages.causal_lm import (
    causal_lm_forward_step, causal_lm_pipeline_batch, causal_lm_pipeline_loss, micro_batch_starts,
    select_forward_step)


class SftStage:
    """Packed conversations, cycled in seeded per-epoch orders; the cursor counts global rows."""

    def __init__(self) -> None:
        self.consumed_rows = 0
        self.first_row = 0  # the global row where the current rows' stream starts (rs_sft rounds)
        self.packed = None
        self.stats: dict = {}

    def setup(self, ctx: StageContext) -> None:
        """Read, template, tokenize and pack the conversations; report what did not fit."""
        self.use_conversations(ctx, read_conversations(ctx.cfg.data.chat.path), f"data.chat.path {ctx.cfg.data.chat.path}")

    def use_conversations(self, ctx: StageContext, conversations: list[list[dict]], source: str,
                          train_turns: list[list[bool]] | None = None, steps: int = 0) -> None:
        """Template, tokenize and pack `conversations` (named `source` in messages) as the
        rows this stage trains on (the rs_sft mode hands its kept dialogues here, with
        `train_turns`: per conversation, which assistant messages are trained, and the `steps`
        it plans, which train.steps 0 leaves to it)."""
        self.forward_step = select_forward_step(ctx.cfg, ctx.device)
        cfg = ctx.cfg
        chat = cfg.data.chat
        template = load_template(chat.template, cfg.data.tokenizer)
        warn_if_markers_split(template, ctx.tokenizer)
        turns = train_turns or [None] * len(conversations)
        examples = [encode_conversation(m, template, ctx.tokenizer, t) for m, t in zip(conversations, turns)]
        self.packed = pack_conversations(examples, cfg.data.seq_len, ctx.tokenizer.eod_id, chat.overflow)
        if len(self.packed.tokens) == 0:
            raise ValueError(f"{source}: no trainable conversation left "
                             f"({self.packed.dropped} longer than data.seq_len={cfg.data.seq_len} were dropped)")
        self.stats = {"conversations": len(conversations), "rows": len(self.packed.tokens),
                      "truncated": self.packed.truncated, "dropped": self.packed.dropped,
                      "trained_tokens": int(self.packed.loss_mask.sum())}
        if self.packed.truncated or self.packed.dropped:
            tqdm.write(f"[sft] {self.packed.truncated} conversation(s) truncated and {self.packed.dropped} dropped "
                       f"for exceeding data.seq_len={cfg.data.seq_len} (data.chat.overflow={chat.overflow})")
        self.global_batch = cfg.train.global_batch_size
        self.micro_batch = cfg.train.micro_batch_size
        self.dp_rank, self.dp_size = ctx.dp_rank, ctx.dp_size
        self.seed = cfg.data.seed
        self.replay_rows, self.replay, self.replay_weight = 0, None, chat.replay_loss_weight
        if chat.replay > 0:
            self.replay_rows = round(self.micro_batch * chat.replay)
            if not 0 < self.replay_rows < self.micro_batch:
                raise ValueError(f"data.chat.replay: {chat.replay} of train.micro_batch_size={self.micro_batch} rows "
                                 f"is {self.replay_rows} replay rows per micro-batch; it must leave at least one row "
                                 "of each kind: change data.chat.replay or micro_batch_size")
            self.size_replay(ctx, steps or cfg.train.steps)
            self.stats["replay_rows_per_micro_batch"] = self.replay_rows

    def size_replay(self, ctx: StageContext, steps: int) -> None:
        """The raw-text replay stream (data.chat.replay), long enough for `steps` steps."""
        micro_batches = steps * self.global_batch // self.micro_batch
        self.replay = corpus_stream(ctx, max(1, micro_batches * self.replay_rows))

    def _row(self, index: int) -> int:
        """The packed row at global position `index` of the endless, per-epoch shuffled stream."""
        epoch, offset = divmod(index, len(self.packed.tokens))
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.packed.tokens))
        return int(order[offset])

    def _micro_batch(self, start: int) -> dict:
        """The micro-batch at global row `start`: micro_batch - replay_rows conversation rows and,
        with replay, replay_rows raw-text rows of data.corpora (loss on every token) after them;
        with a replay_loss_weight other than 1 the loss mask holds per-token weights (float)."""
        index, chat_rows = start // self.micro_batch, self.micro_batch - self.replay_rows
        local = (start - self.first_row) // self.micro_batch  # micro-batches since the rows were set
        rows = [self._row(i) for i in range(local * chat_rows, (local + 1) * chat_rows)]
        p = self.packed
        batch = {"tokens": torch.from_numpy(p.tokens[rows]), "labels": torch.from_numpy(p.labels[rows]),
                 "loss_mask": torch.from_numpy(p.loss_mask[rows]),
                 "position_ids": torch.from_numpy(p.position_ids[rows]),
                 "document_ids": torch.from_numpy(p.document_ids[rows])}  # each [B, S]
        if self.replay is not None:
            text = self.replay.micro_batch(index * self.replay_rows, self.replay_rows)
            if self.replay_weight != 1.0:
                batch["loss_mask"] = batch["loss_mask"].float()
                text = {**text, "loss_mask": text["loss_mask"].float() * self.replay_weight}  # [r, S] weights
            batch = {key: torch.cat([value, text[key].to(value.device, value.dtype)]) for key, value in batch.items()}
        return batch

    def batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of the next global batch; advances the cursor."""
        starts = micro_batch_starts(self.consumed_rows, self.global_batch, self.micro_batch, self.dp_rank,
                                    self.dp_size)
        micro = [self._micro_batch(start) for start in starts]
        self.consumed_rows += self.global_batch
        return micro

    # the causal-LM step on packed rows, shared with the other next-token stages (setup picks
    # the fused-cross-entropy form when kernels.fused_cross_entropy)
    forward_step = staticmethod(causal_lm_forward_step)
    pipeline_batch = staticmethod(causal_lm_pipeline_batch)
    pipeline_loss = staticmethod(causal_lm_pipeline_loss)

    def state_dict(self) -> dict:
        """The data cursor."""
        return {"consumed_rows": self.consumed_rows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor."""
        self.consumed_rows = int(state["consumed_rows"])
