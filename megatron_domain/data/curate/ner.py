"""The model-based PII detector: a spaCy pipeline's named entities (people, places, addresses)
become typed placeholders, after the patterns of curate/pii.py have run.

`pii.ner_model` names an installed spaCy pipeline package (e.g. `en_core_web_sm`, installed from
spaCy's model releases: `pip install https://github.com/explosion/spacy-models/releases/...`)
or a folder a pipeline was saved to (`nlp.to_disk`, e.g. one fine-tuned on your own
identifiers, or with an `entity_ruler` of patterns for them: employee ids, ticket numbers). Nothing is downloaded at run time; PyPI has no official spaCy model package, so
none is a dependency and, without `pii.ner_model`, the report says redaction was regex only.
spaCy rather than Presidio: Presidio's name and address recognizers are this same spaCy NER
behind another layer, and spaCy is already installed for datatrove's word tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_LABELS = {"PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "ADDRESS"}
PLACEHOLDER = re.compile(r"<[A-Z_]+>")
MAX_CHUNK_CHARS = 100_000  # spaCy's parse cost grows with the text: long documents go by paragraphs


def check_ner_model(model: str) -> str | None:
    """None if `model` is an installed spaCy package or a saved pipeline folder, else the problem."""
    import spacy

    if Path(model).is_dir() or spacy.util.is_package(model):
        return None
    return (f"{model!r} is neither an installed spaCy pipeline package nor a folder; install one from spaCy's "
            "model releases or leave it empty (regex only)")


class NerRedactor:
    """Replaces the entities of the mapped labels with `<PLACEHOLDER>`; counts per placeholder type."""

    def __init__(self, model: str, labels: dict[str, str] | None = None):
        import spacy

        self.labels = dict(labels or DEFAULT_LABELS)
        self.nlp = spacy.load(model, exclude=["lemmatizer", "textcat"])
        if not {"ner", "entity_ruler"} & set(self.nlp.pipe_names):
            raise ValueError(f"pii.ner_model {model!r}: the pipeline has no `ner` or `entity_ruler` component "
                             f"({self.nlp.pipe_names})")

    def chunks(self, text: str) -> list[tuple[int, str]]:
        """(offset, chunk) pieces of at most MAX_CHUNK_CHARS, cut at paragraph breaks."""
        pieces, start = [], 0
        while start < len(text):
            end = min(len(text), start + MAX_CHUNK_CHARS)
            if end < len(text):
                cut = text.rfind("\n\n", start, end)
                end = cut + 2 if cut > start else end
            pieces.append((start, text[start:end]))
            start = end
        return pieces

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """(text with entity placeholders, {type: count}); placeholders already there are left alone."""
        spans, counts = [], {}
        taken = [m.span() for m in PLACEHOLDER.finditer(text)]
        for offset, chunk in self.chunks(text):
            for ent in self.nlp(chunk).ents:
                kind = self.labels.get(ent.label_)
                start, end = offset + ent.start_char, offset + ent.end_char
                if kind is None or any(start < t_end and t_start < end for t_start, t_end in taken):
                    continue
                spans.append((start, end, kind))
                counts[kind.lower()] = counts.get(kind.lower(), 0) + 1
        for start, end, kind in sorted(spans, reverse=True):
            text = text[:start] + f"<{kind}>" + text[end:]
        return text, counts
