"""`mdt data curate CONFIG`: the curation pipeline on datatrove's executors.

Phases (each a datatrove executor with its own logging folder under `<output_dir>/work/logs`,
so a killed run skips the shards that finished):

1. read: our RawDocumentReader per input folder -> TextCleaner -> work/1_read/*.jsonl
2. exact dedup (datatrove's span dedup: signatures, find duplicates, filter) -> work/2_exact
3. near dedup (datatrove's MinHash: signatures, LSH buckets, clusters, filter) -> work/3_near;
   the removed documents keep their cluster id (removed/near_dedup)
4. redact and filter: PiiRedactor -> Gopher quality and repetition filters -> `<output_dir>/jsonl`
   (with `quality.classifier`: -> QualityScorer -> work/4_scored, then one task computes the
   `drop_fraction` quantile of every score and a last phase drops the documents below it ->
   `<output_dir>/jsonl`)
5. finish: tokenize (with `tokenizer`: `<output_dir>/corpus.bin/.idx` or `output_prefix`, the
   engine's indexed dataset) and write the report

`executor: local` runs each phase with worker processes here, `ray` on a Ray cluster (a local one
by default), both phase after phase; `slurm` submits every phase as a job array depending on the
one before (the finish step too) and returns: the report appears when the last job ends.

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

    from megatron_domain.data.curate.steps import (
        PiiRedactor, QualityClassifierFilter, QualityScorer, QualityThreshold, RawDocumentReader, RegexWordTokenizer,
        TextCleaner)

    # sha1, not datatrove's default xxhash: datatrove 0.10 hands str to xxhash, which xxhash >= 4
    # refuses ("Strings must be encoded before hashing")
    hashing = HashConfig(precision=64, hash_fc="sha1")
    # the word tokenizer of dedup and the Gopher filters (steps.RegexWordTokenizer says why)
    words = RegexWordTokenizer() if cfg.word_tokenizer == "regex" else cfg.language
    out = Path(cfg.output_dir)
    work, removed = out / "work", out / "removed"
    tasks = cfg.tasks or cfg.workers
    readers = [RawDocumentReader(folder, str(work / "problems" / f"input{i}"), cfg.text_key)
               for i, folder in enumerate(cfg.inputs)]
    phases = [Phase("read", readers + [TextCleaner(cfg.cleanup.collapse_spaces), jsonl_writer(work / "1_read")], tasks)]
    current = work / "1_read"
    if cfg.exact_dedup.enabled:
        e = cfg.exact_dedup
        sent = SentDedupConfig(n_sentences=e.span, split_sentences=e.unit == "sentences", min_doc_words=e.min_doc_words,
                               min_num_sentences=0, min_words_to_remove_span=e.min_span_words, hash_config=hashing)
        phases += [Phase("exact_signatures", [jsonl_reader(current),
                                              SentenceDedupSignature(str(work / "exact_sigs"), config=sent,
                                                                                     language=words)], tasks),
                   Phase("exact_find", [SentenceFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"),
                                                           config=sent)], 1),
                   Phase("exact_filter", [jsonl_reader(current),
                                          SentenceDedupFilter(str(work / "exact_dups"), config=sent, language=words,
                                                              exclusion_writer=jsonl_writer(removed / "exact_dedup")),
                                          jsonl_writer(work / "2_exact")], tasks)]
        current = work / "2_exact"
    if cfg.near_dedup.enabled:
        n = cfg.near_dedup
        mh = MinhashConfig(n_grams=n.n_grams, num_buckets=n.bands, hashes_per_bucket=n.rows, seed=n.seed,
                           hash_config=hashing)
        phases += [Phase("near_signatures", [jsonl_reader(current),
                                             MinhashDedupSignature(str(work / "near_sigs"), config=mh,
                                                                   language=words)], tasks),
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
        final.append(PiiRedactor(cfg.pii.types, cfg.pii.ner_model, dict(cfg.pii.ner_labels)))
    if cfg.quality.enabled:
        q = cfg.quality
        final.append(GopherQualityFilter(
            language=words, min_doc_words=q.min_words, max_doc_words=q.max_words,
            min_avg_word_length=q.min_avg_word_length,
            max_avg_word_length=q.max_avg_word_length, max_symbol_word_ratio=q.max_symbol_word_ratio,
            max_bullet_lines_ratio=q.max_bullet_lines_ratio, max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=q.min_alpha_words_ratio, min_stop_words=q.min_stop_words,
            exclusion_writer=jsonl_writer(removed / "quality")))
        if q.repetition:
            final.append(GopherRepetitionFilter(language=words, exclusion_writer=jsonl_writer(removed / "repetition")))
    q = cfg.quality
    if not q.classifier:
        phases.append(Phase("redact_filter", final + [jsonl_writer(out / "jsonl")], tasks))
        return phases
    scores, threshold = work / "quality_scores", work / "quality_threshold.json"
    phases += [Phase("redact_filter", final + [QualityScorer(q.classifier, str(scores)), jsonl_writer(work / "4_scored")],
                     tasks),
               Phase("quality_threshold", [QualityThreshold(str(scores), q.drop_fraction, str(threshold))], 1),
               Phase("quality_classifier", [jsonl_reader(work / "4_scored"), QualityClassifierFilter(
                   str(threshold), exclusion_writer=jsonl_writer(removed / "quality_classifier")),
                   jsonl_writer(out / "jsonl")], tasks)]
    return phases


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send this process's and its children's stderr (file descriptor 2: datatrove's loguru
    output, INFO per task) to `path`; yields a stream to the terminal's stderr (for our progress
    bars); on an error the log's tail goes into the exception."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1)
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield console
        except Exception as exc:
            os.dup2(saved, 2)
            raise RuntimeError(f"{exc}\n(the executor's log, {path}, ends with:)\n{path.read_text()[-3000:]}") from exc
        finally:
            sys.stderr.flush()
            console.close()
            os.dup2(saved, 2)
            os.close(saved)


def run_curation(cfg: CurateConfig, progress: bool = True) -> dict:
    """Run every phase (finished shards of an earlier, killed run are skipped), tokenize, and
    write the report; returns it. datatrove's own log goes to `<output_dir>/work/logs/datatrove.log`;
    each phase prints one line with its documents and documents/s. With `executor: slurm` the
    phases are submitted and {"submitted": [job ids]} is returned (the report follows on the cluster)."""
    from megatron_domain.data.curate.report import flow, phase_stats

    logs = Path(cfg.output_dir) / "work" / "logs"
    phases = build_phases(cfg)
    if cfg.executor == "slurm":
        return submit_to_slurm(cfg, phases, logs)
    seconds: dict[str, float] = {}
    for i, phase in enumerate(phases, 1):
        folder = logs / f"{i:02d}_{phase.name}"
        started = time.perf_counter()
        with stderr_to(logs / "datatrove.log") as console, \
                PhaseProgress(phase, folder, f"{i}/{len(phases)} {phase.name}", progress, console):
            executor(cfg, phase, folder).run()
        seconds[phase.name] = time.perf_counter() - started
        if progress:
            docs = flow(phase_stats(folder)).get("documents_in", 0)
            rate = f", {docs / seconds[phase.name]:,.0f} documents/s" if docs else ""
            print(f"[curate] {i}/{len(phases)} {phase.name}: {phase.tasks} task(s), {seconds[phase.name]:.1f} s{rate}",
                  flush=True)
    return finish_curation(cfg, phases, progress, seconds)


class PhaseProgress:
    """A progress bar while a phase runs: documents its writer has written so far (with the
    rate), or finished tasks for a phase that writes no documents; polled from the files."""

    def __init__(self, phase: Phase, logging_dir: Path, desc: str, enabled: bool, stream, interval: float = 0.5):
        import threading

        from datatrove.pipeline.writers.disk_base import DiskWriter

        writer = phase.steps[-1]
        self.output = Path(writer.output_folder.path) if isinstance(writer, DiskWriter) else None
        self.completions, self.tasks = logging_dir / "completions", phase.tasks
        self.desc, self.enabled, self.stream, self.interval = desc, enabled, stream, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def count(self) -> int:
        """Documents written so far (lines of the output files), else tasks finished."""
        if self.output is None:
            return len(list(self.completions.glob("*"))) if self.completions.is_dir() else 0
        total = 0
        for path in self.output.glob("*.jsonl"):
            with path.open("rb") as handle:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        return total

    def poll(self) -> None:
        """Update the bar until the phase ends."""
        from tqdm import tqdm

        unit = "doc" if self.output is not None else "task"
        with tqdm(desc=f"[curate] {self.desc}", unit=unit, total=None if self.output is not None else self.tasks,
                  dynamic_ncols=True, leave=False, file=self.stream, disable=None) as bar:  # None: off when not a terminal
            while not self.stop.wait(self.interval):
                bar.update(self.count() - bar.n)
            bar.update(self.count() - bar.n)

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()


def executor(cfg: CurateConfig, phase: Phase, logging_dir: Path, depends=None):
    """The datatrove executor of one phase under `cfg.executor`."""
    if cfg.executor == "ray":
        import ray
        from datatrove.executor import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init(address=cfg.ray.address or None, num_cpus=None if cfg.ray.address else cfg.workers,
                     include_dashboard=False, log_to_driver=False)
        return RayPipelineExecutor(pipeline=phase.steps, tasks=phase.tasks, workers=cfg.workers,
                                   logging_dir=str(logging_dir), cpus_per_task=cfg.ray.cpus_per_task,
                                   mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb)
    if cfg.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = cfg.slurm
        return SlurmPipelineExecutor(pipeline=phase.steps, tasks=phase.tasks, time=s.time, partition=s.partition,
                                     cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos,
                                     env_command=s.env_command or None, sbatch_args=dict(s.sbatch_args),
                                     job_name=f"curate_{phase.name}", logging_dir=str(logging_dir), depends=depends,
                                     slurm_logs_folder=str(logging_dir / "slurm_logs"))
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(pipeline=phase.steps, tasks=phase.tasks, workers=min(cfg.workers, phase.tasks),
                                 logging_dir=str(logging_dir), start_method="spawn")


class FinishCuration:
    """The last Slurm job: tokenize and write the report (a datatrove step, so it runs in the array)."""

    def __init__(self, cfg: CurateConfig, phases: list[Phase]):
        self.cfg, self.phases = cfg, phases

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        finish_curation(self.cfg, self.phases, progress=False)
        return iter(())


def submit_to_slurm(cfg: CurateConfig, phases: list[Phase], logs: Path) -> dict:
    """Submit every phase and the finish step as chained job arrays; their job ids."""
    previous, executors = None, []
    steps = phases + [Phase("finish", [FinishCuration(cfg, phases)], 1)]
    for i, phase in enumerate(steps, 1):
        previous = executor(cfg, phase, logs / f"{i:02d}_{phase.name}", depends=previous)
        executors.append(previous)
    previous.run()  # launches its dependencies first
    return {"submitted": [{"phase": p.name, "job_id": e.job_id} for p, e in zip(steps, executors)]}


def finish_curation(cfg: CurateConfig, phases: list[Phase], progress: bool,
                    seconds: dict[str, float] | None = None) -> dict:
    """Tokenize the curated JSONL (with `tokenizer`) and write the report (with each phase's
    wall time when known); returns it."""
    from megatron_domain.data.curate.report import write_report

    tokenized = tokenize_output(cfg, progress) if cfg.tokenizer else None
    return write_report(cfg, phases, Path(cfg.output_dir) / "work" / "logs", tokenized, seconds)


def tokenize_output(cfg: CurateConfig, progress: bool) -> dict:
    """The curated JSONL as the engine's indexed dataset `<output_dir>/corpus` (our preprocess)."""
    from megatron_domain.data.preprocess import preprocess
    from megatron_domain.data.tokenizer import load_tokenizer

    files = sorted(str(p) for p in (Path(cfg.output_dir) / "jsonl").glob("*.jsonl"))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    prefix = cfg.output_prefix or str(Path(cfg.output_dir) / "corpus")
    stats = preprocess(files, tokenizer, prefix, progress=progress)
    return {"prefix": prefix, **stats}
