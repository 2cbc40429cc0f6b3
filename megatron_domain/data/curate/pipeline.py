"""`mdt data curate CONFIG`: the curation pipeline on datatrove's executors.

Phases (each a datatrove executor with its own logging folder under `<output_dir>/work/logs`,
so a killed run skips the shards that finished):

1. read: our RawDocumentReader per input folder -> TextCleaner -> work/1_read/*.jsonl
2. exact dedup (datatrove's span dedup: signatures, find duplicates, filter) -> work/2_exact
3. near dedup (datatrove's MinHash: signatures, LSH buckets, clusters, filter) -> work/3_near;
   the removed documents keep their cluster id (removed/near_dedup)
4. redact and filter: PiiRedactor -> Gopher quality and repetition filters -> `<output_dir>/jsonl`
5. tokenize (with `tokenizer`): `<output_dir>/corpus.bin/.idx`, the engine's indexed dataset

Every filter writes what it removed to `<output_dir>/removed/<step>/`; the report
(`curation_report.json` / `.md`, curate/report.py) reads the executors' stats and these folders.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_domain.data.curate.config import CurateConfig


@dataclass
class Phase:
    """One executor: its name, the steps, the number of tasks."""

    name: str
    steps: list
    tasks: int


def jsonl_writer(folder: Path):
    """Uncompressed JSONL, one file per task (readable, and what our preprocess reads)."""
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)


def jsonl_reader(folder: Path):
    """The documents a previous phase wrote, in the same per-task order."""
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None, add_file_path=False)


def build_phases(cfg: CurateConfig) -> list[Phase]:
    """The executors to run, in order (see the module docstring)."""
    from datatrove.pipeline.dedup import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
        SentenceDedupFilter, SentenceDedupSignature, SentenceFindDedups)
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.hashing import HashConfig

    from megatron_domain.data.curate.steps import PiiRedactor, RawDocumentReader, TextCleaner

    # sha1, not datatrove's default xxhash: datatrove 0.10 hands str to xxhash, which xxhash >= 4
    # refuses ("Strings must be encoded before hashing")
    hashing = HashConfig(precision=64, hash_fc="sha1")
    out = Path(cfg.output_dir)
    work, removed = out / "work", out / "removed"
    tasks = cfg.tasks or cfg.workers
    readers = [RawDocumentReader(folder, str(work / "problems" / f"input{i}"), cfg.text_key)
               for i, folder in enumerate(cfg.inputs)]
    phases = [Phase("read", readers + [TextCleaner(), jsonl_writer(work / "1_read")], tasks)]
    current = work / "1_read"
    if cfg.exact_dedup.enabled:
        e = cfg.exact_dedup
        sent = SentDedupConfig(n_sentences=e.span, split_sentences=e.unit == "sentences", min_doc_words=e.min_doc_words,
                               min_num_sentences=0, min_words_to_remove_span=e.min_span_words, hash_config=hashing)
        phases += [Phase("exact_signatures", [jsonl_reader(current),
                                              SentenceDedupSignature(str(work / "exact_sigs"), config=sent)], tasks),
                   Phase("exact_find", [SentenceFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"),
                                                           config=sent)], 1),
                   Phase("exact_filter", [jsonl_reader(current),
                                          SentenceDedupFilter(str(work / "exact_dups"), config=sent,
                                                              exclusion_writer=jsonl_writer(removed / "exact_dedup")),
                                          jsonl_writer(work / "2_exact")], tasks)]
        current = work / "2_exact"
    if cfg.near_dedup.enabled:
        n = cfg.near_dedup
        mh = MinhashConfig(n_grams=n.n_grams, num_buckets=n.bands, hashes_per_bucket=n.rows, seed=n.seed,
                           hash_config=hashing)
        phases += [Phase("near_signatures", [jsonl_reader(current),
                                             MinhashDedupSignature(str(work / "near_sigs"), config=mh)], tasks),
                   Phase("near_buckets", [MinhashDedupBuckets(str(work / "near_sigs"), str(work / "near_buckets"),
                                                              config=mh)], n.bands),
                   Phase("near_clusters", [MinhashDedupCluster(str(work / "near_buckets"), str(work / "near_ids"),
                                                               config=mh, save_cluster_id=True,
                                                               save_cluster_size=True)], 1),
                   Phase("near_filter", [jsonl_reader(current),
                                         MinhashDedupFilter(str(work / "near_ids"),
                                                            exclusion_writer=jsonl_writer(removed / "near_dedup"),
                                                            load_cluster_ids=True, load_cluster_sizes=True),
                                         jsonl_writer(work / "3_near")], tasks)]
        current = work / "3_near"
    final = [jsonl_reader(current)]
    if cfg.pii.enabled:
        final.append(PiiRedactor(cfg.pii.types))
    if cfg.quality.enabled:
        q = cfg.quality
        final.append(GopherQualityFilter(
            min_doc_words=q.min_words, max_doc_words=q.max_words, min_avg_word_length=q.min_avg_word_length,
            max_avg_word_length=q.max_avg_word_length, max_symbol_word_ratio=q.max_symbol_word_ratio,
            max_bullet_lines_ratio=q.max_bullet_lines_ratio, max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=q.min_alpha_words_ratio, min_stop_words=q.min_stop_words,
            exclusion_writer=jsonl_writer(removed / "quality")))
        if q.repetition:
            final.append(GopherRepetitionFilter(exclusion_writer=jsonl_writer(removed / "repetition")))
    final.append(jsonl_writer(out / "jsonl"))
    phases.append(Phase("redact_filter", final, tasks))
    return phases


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send this process's and its children's stderr (file descriptor 2: datatrove's loguru
    output, INFO per task) to `path`; on an error the log's tail goes into the exception."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as exc:
            os.dup2(saved, 2)
            raise RuntimeError(f"{exc}\n(the executor's log, {path}, ends with:)\n{path.read_text()[-3000:]}") from exc
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_curation(cfg: CurateConfig, progress: bool = True) -> dict:
    """Run every phase (finished shards of an earlier, killed run are skipped), tokenize, and
    write the report; returns it. datatrove's own log goes to `<output_dir>/work/logs/datatrove.log`;
    each phase prints one line with its documents and documents/s."""
    from datatrove.executor import LocalPipelineExecutor

    from megatron_domain.data.curate.report import flow, phase_stats, write_report

    out = Path(cfg.output_dir)
    logs = out / "work" / "logs"
    phases = build_phases(cfg)
    for i, phase in enumerate(phases, 1):
        folder = logs / f"{i:02d}_{phase.name}"
        started = time.perf_counter()
        with stderr_to(logs / "datatrove.log"):
            LocalPipelineExecutor(pipeline=phase.steps, tasks=phase.tasks, workers=min(cfg.workers, phase.tasks),
                                  logging_dir=str(folder), start_method="spawn").run()
        seconds = time.perf_counter() - started
        if progress:
            docs = flow(phase_stats(folder)).get("documents_in", 0)
            rate = f", {docs / seconds:,.0f} documents/s" if docs else ""
            print(f"[curate] {i}/{len(phases)} {phase.name}: {phase.tasks} task(s), {seconds:.1f} s{rate}", flush=True)
    tokenized = tokenize_output(cfg, progress) if cfg.tokenizer else None
    return write_report(cfg, phases, logs, tokenized)


def tokenize_output(cfg: CurateConfig, progress: bool) -> dict:
    """The curated JSONL as the engine's indexed dataset `<output_dir>/corpus` (our preprocess)."""
    from megatron_domain.data.preprocess import preprocess
    from megatron_domain.data.tokenizer import load_tokenizer

    files = sorted(str(p) for p in (Path(cfg.output_dir) / "jsonl").glob("*.jsonl"))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    stats = preprocess(files, tokenizer, str(Path(cfg.output_dir) / "corpus"), progress=progress)
    return {"prefix": str(Path(cfg.output_dir) / "corpus"), **stats}
