"""The curation steps datatrove lacks, as datatrove PipelineSteps (so its executors shard,
parallelise and resume them like its own):

- `RawDocumentReader`: folders of .jsonl (a configurable text field), .txt, .md, .html / .htm
  (main content by trafilatura) and .pdf (the text layer by pypdf). Every document gets an id
  (`<path relative to its input>#<index>`) and its source path. A file or line that cannot be
  read, an empty document, a PDF without a text layer or an unsupported extension is counted and
  written, with the reason, to `<problems_dir>/<rank>.jsonl`; the other documents go on.
- `TextCleaner`: Unicode NFC normalization and whitespace cleanup (trailing spaces, runs of
  spaces and tabs, more than two newlines); a document left empty is dropped and counted.
- `PiiRedactor`: curate/pii.py's typed placeholders, counted per type.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseDiskReader

from megatron_domain.data.curate.pii import PII_TYPES, redact

TEXT_EXTENSIONS = (".txt", ".md")
HTML_EXTENSIONS = (".html", ".htm")
SUPPORTED_EXTENSIONS = (".jsonl",) + TEXT_EXTENSIONS + HTML_EXTENSIONS + (".pdf",)


def html_main_text(html: str) -> str:
    """The main content of an HTML page (trafilatura; no comments, tables kept), '' if none."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True) or ""


def pdf_text(path: Path) -> str:
    """The text layer of a PDF, page after page ('' for a scanned PDF without one)."""
    from pypdf import PdfReader

    pages = [page.extract_text() or "" for page in PdfReader(str(path)).pages]
    return "\n\n".join(p.strip() for p in pages if p.strip())


class RawDocumentReader(BaseDiskReader):
    """Documents of every supported file under `data_folder` (see the module docstring)."""

    name = "📖 raw documents"

    def __init__(self, data_folder: str, problems_dir: str, text_key: str = "text"):
        super().__init__(data_folder, text_key=text_key, recursive=True, add_file_path=False)
        self.root = Path(data_folder)
        self.problems_dir = Path(problems_dir)
        self._problems = None

    def problem(self, path: str, reason: str, line: int | None = None) -> None:
        """Count a skipped input and record where and why."""
        self.stat_update(f"skipped_{reason.split(':')[0].replace(' ', '_')}")
        record = {"path": str(self.root / path), "reason": reason, **({"line": line} if line is not None else {})}
        self._problems.write(json.dumps(record) + "\n")
        self._problems.flush()

    def document(self, text: str, path: str, index: int, kind: str, extra: dict | None = None) -> Document | None:
        """A Document with id and source, or None (counted) when the text is empty."""
        if not text.strip():
            self.problem(path, f"empty document: no text after {kind} extraction", index if kind == "jsonl" else None)
            return None
        return Document(text=text, id=f"{path}#{index}",
                        metadata={"source": str(self.root / path), "format": kind, **(extra or {})})

    def read_file(self, filepath: str) -> DocumentsPipeline:
        """The documents of one file (none, and a recorded problem, when it cannot be read)."""
        suffix = Path(filepath).suffix.lower()
        full = self.root / filepath
        try:
            if suffix == ".jsonl":
                yield from self.read_jsonl(filepath, full)
                return
            if suffix in TEXT_EXTENSIONS:
                doc = self.document(full.read_text(encoding="utf-8"), filepath, 0, suffix[1:])
            elif suffix in HTML_EXTENSIONS:
                doc = self.document(html_main_text(full.read_text(encoding="utf-8", errors="replace")), filepath, 0,
                                    "html")
            elif suffix == ".pdf":
                text = pdf_text(full)
                if not text:
                    self.problem(filepath, "pdf without a text layer: scanned? run an OCR tool first (README)")
                    return
                doc = self.document(text, filepath, 0, "pdf")
            else:
                self.problem(filepath, f"unsupported extension: {suffix or '(none)'}; supported: "
                                       f"{', '.join(SUPPORTED_EXTENSIONS)}")
                return
        except Exception as exc:  # any unreadable file is recorded and skipped, never fatal
            self.problem(filepath, f"unreadable: {type(exc).__name__}: {exc}")
            return
        if doc is not None:
            yield doc

    def read_jsonl(self, filepath: str, full: Path) -> DocumentsPipeline:
        """One document per JSON line with a string `text_key`; bad lines are recorded and skipped."""
        with full.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    self.problem(filepath, f"invalid json: {exc.msg}", number)
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
                    self.problem(filepath, f"no text: expected an object with a string {self.text_key!r}", number)
                    continue
                extra = {k: v for k, v in record.items() if k != self.text_key and isinstance(v, (str, int, float))}
                doc = self.document(record[self.text_key], filepath, number, "jsonl", {"fields": extra} if extra else None)
                if doc is not None:
                    yield doc

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """This rank's share of the files; problems go to `<problems_dir>/<rank>.jsonl`."""
        self.problems_dir.mkdir(parents=True, exist_ok=True)
        with (self.problems_dir / f"{rank:05d}.jsonl").open("w") as self._problems:
            yield from super().run(data, rank, world_size)


SPACES = re.compile(r"[ \t\u00a0]+")
BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, no carriage returns, single spaces, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class TextCleaner(PipelineStep):
    """Unicode / whitespace cleanup; empty results are dropped (counted as `dropped_empty`)."""

    name = "🧹 clean text"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Clean every document."""
        for doc in data:
            with self.track_time():
                doc.text = clean_text(doc.text)
            if not doc.text:
                self.stat_update("dropped_empty")
                continue
            self.stat_update("forwarded")
            yield doc


class PiiRedactor(PipelineStep):
    """Typed placeholders for the enabled PII types; counts per type (`pii_<type>`) and the
    number of documents with any PII (`documents_with_pii`)."""

    name = "🔒 PII redaction"
    type = "✂️ - FORMAT"

    def __init__(self, types: list[str] | tuple[str, ...] = PII_TYPES):
        super().__init__()
        self.types = tuple(types)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Redact every document."""
        for doc in data:
            with self.track_time():
                doc.text, counts = redact(doc.text, self.types)
            for kind, count in counts.items():
                self.stat_update(f"pii_{kind}", value=count)
            if counts:
                self.stat_update("documents_with_pii")
            yield doc
