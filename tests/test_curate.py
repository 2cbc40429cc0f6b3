"""`mdt data curate` on small fixtures the tests write themselves: every input format extracts
to the expected text (HTML main content, a PDF's text layer), bad inputs are counted and named
without losing the other documents, a known duplicate and near-duplicate are removed and an
unrelated document is not, duplicated paragraphs are cut, every PII type is redacted while
ordinary numbers and code stay, a low-quality document is filtered, the output is tokenized into
the engine's indexed dataset, and a killed run resumes, redoing only the unfinished shard."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("trafilatura")
pytest.importorskip("pypdf")

from megatron_domain.data.curate.pii import iban_valid, luhn_valid, redact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is that for it as with was on be by this are from or at which an have not but printer "
         "driver firmware update network cable power supply paper tray toner cartridge error code reset button "
         "manual screen menu option setting").split()
BOILERPLATE = "This manual is provided as is without any warranty of any kind and may change without notice."


def prose(seed: int, words: int = 150) -> str:
    """Random English-like text (passes the Gopher heuristics: stop words, word lengths)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def minimal_pdf(text: str | None) -> bytes:
    """A one-page PDF whose content stream draws `text` in Helvetica (None: a blank page, like a
    scanned page without a text layer), with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
               b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
               b"<</Length %d>>stream\n" % len(stream) + stream + b"\nendstream",
               b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def write_inputs(folder: Path) -> dict:
    """The fixture corpus; returns the texts the checks look for."""
    (folder / "jsonl").mkdir(parents=True)
    (folder / "other").mkdir()
    docs = [prose(i) for i in range(12)]
    near = docs[0].split()
    near[10], near[70] = "zebra", "yak"  # Jaccard of 5-gram shingles with docs[0] ~0.9
    pii = ("Write to jane.doe@example.com or call +1 415-555-2671, IBAN DE89 3704 0044 0532 0130 00, card "
           "4111 1111 1111 1111, server 192.168.0.1, SSN 123-45-6789. Keep x = 12345 + 67890 and range(10, 20) "
           "and 2024-01-15 and 4111 1111 1111 1112 as they are. " + prose(100))
    records = [{"text": d} for d in docs]
    records[3]["text"] += "\n" + BOILERPLATE
    records[4]["text"] += "\n" + BOILERPLATE
    records += [{"text": docs[1]}, {"text": " ".join(near)}, {"text": pii}, {"text": "buy now " * 60},
                {"text": "   "}, {"title": "no text field"}]
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "{this is not json")
    (folder / "jsonl" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "other" / "notes.txt").write_text(prose(200) + "\r\n\r\n\r\n\r\nTrailing   spaces   here.   \n")
    (folder / "other" / "readme.md").write_text("# Setup\n\n" + prose(201))
    article = prose(202)
    (folder / "other" / "page.html").write_text(
        f"<html><head><title>t</title></head><body><nav>Home | Products | About us</nav><article><h1>Printer "
        f"guide</h1><p>{article}</p></article><footer>Copyright 2026 Example Corp, all rights reserved</footer>"
        "</body></html>")
    pdf_words = ("The toner cartridge must be replaced when the error light on the front of the printer blinks twice, "
                 "and the paper tray must be closed before the printer is switched on again")
    (folder / "other" / "guide.pdf").write_bytes(minimal_pdf(pdf_words))
    (folder / "other" / "scan.pdf").write_bytes(minimal_pdf(None))
    (folder / "other" / "image.png").write_bytes(b"\x89PNG\r\n")
    (folder / "other" / "broken.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    return {"docs": docs, "article": article, "pdf": pdf_words}


def curate(tmp_path: Path, inputs: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({"inputs": [str(inputs / "jsonl"), str(inputs / "other")],
                                  "output_dir": str(tmp_path / name), "workers": 2,
                                  "quality": {"min_words": 20}}))
    return subprocess.run([sys.executable, "-m", "megatron_domain.cli", "data", "curate", str(config), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, corpora):
    tmp = tmp_path_factory.mktemp("curate")
    texts = write_inputs(tmp / "raw")
    run = curate(tmp, tmp / "raw", "out", "--set", f"tokenizer={corpora['tokenizer']}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = tmp / "out"
    docs = [json.loads(line) for path in sorted((out / "jsonl").glob("*.jsonl"))
            for line in path.read_text().splitlines()]
    return {"tmp": tmp, "out": out, "texts": texts, "docs": {d["id"]: d for d in docs}, "stdout": run.stdout,
            "report": json.loads((out / "curation_report.json").read_text())}


def test_every_format_extracts_and_bad_inputs_are_named(curated):
    docs, texts, report = curated["docs"], curated["texts"], curated["report"]
    html = docs["page.html#0"]["text"]
    assert texts["article"][:200] in html and "Printer guide" in html
    assert "Home | Products" not in html and "Copyright 2026" not in html  # navigation and footer dropped
    assert docs["guide.pdf#0"]["text"] == texts["pdf"] and docs["guide.pdf#0"]["metadata"]["format"] == "pdf"
    notes = docs["notes.txt#0"]["text"]
    assert notes.endswith(".\n\nTrailing spaces here.") and "\r" not in notes  # whitespace cleaned
    assert docs["readme.md#0"]["text"].startswith("# Setup\n\n")
    assert docs["docs.jsonl#1"]["metadata"]["source"].endswith("jsonl/docs.jsonl")
    skipped = {(Path(p["path"]).name, p.get("line"), p["reason"].split(":")[0]) for p in report["read"]["skipped_inputs"]}
    assert skipped == {("docs.jsonl", 6, "invalid json"), ("docs.jsonl", 18, "empty document"),
                       ("docs.jsonl", 19, "no text"), ("scan.pdf", None, "pdf without a text layer"),
                       ("image.png", None, "unsupported extension"), ("broken.txt", None, "unreadable")}
    assert report["read"]["files"] == 8 and report["read"]["documents"] == 16 + 4
    assert report["read"]["skipped"] == {"invalid_json": 1, "empty_document": 1, "no_text": 1,
                                         "pdf_without_a_text_layer": 1, "unsupported_extension": 1, "unreadable": 1}


def test_duplicates_near_duplicates_and_paragraphs(curated):
    docs, texts, report = curated["docs"], curated["texts"], curated["report"]
    kept = [d["text"] for d in docs.values()]
    assert sum(texts["docs"][1] in t for t in kept) == 1  # the exact duplicate (line 14) is gone
    assert "docs.jsonl#15" not in docs and "docs.jsonl#1" in docs  # the near-duplicate of line 1 too
    assert sum(BOILERPLATE in t for t in kept) == 1  # the shared paragraph stays in one document only
    assert all(f"docs.jsonl#{i}" in docs for i in (2, 3, 4, 7, 8, 9))  # unrelated documents all kept
    clusters = report["near_duplicates"]["largest"]
    assert report["near_duplicates"]["clusters"] == 1 and clusters[0]["removed"] == ["docs.jsonl#15"]
    exact = report["removed"]["exact_dedup"]
    assert exact["by_reason"] == {"duplicate document (nothing left)": 1, "duplicate spans cut (document kept)": 1}


def test_pii_redacted_and_quality_filtered(curated):
    docs, report = curated["docs"], curated["report"]
    pii = docs["docs.jsonl#16"]["text"]
    for placeholder in ("<EMAIL>", "<PHONE>", "<IBAN>", "<CREDIT_CARD>", "<IP_ADDRESS>", "<NATIONAL_ID>"):
        assert placeholder in pii
    assert "x = 12345 + 67890 and range(10, 20) and 2024-01-15 and 4111 1111 1111 1112" in pii
    assert report["pii"] == {"email": 1, "phone": 1, "iban": 1, "credit_card": 1, "ip": 1, "national_id": 1}
    assert "docs.jsonl#17" not in docs  # "buy now" x 60
    assert report["removed"]["quality"]["count"] + report["removed"].get("repetition", {}).get("count", 0) == 1
    assert report["phases"]["redact_filter"]["documents_out"] == len(docs)


def test_output_is_the_engines_indexed_dataset(curated, corpora):
    from megatron_domain.data.indexed import check_prefix
    from megatron_domain.data.tokenizer import load_tokenizer

    tokenized = curated["report"]["tokenized"]
    check_prefix(tokenized["prefix"], "curated")
    assert tokenized["documents"] == len(curated["docs"])
    tokenizer = load_tokenizer(corpora["tokenizer"])
    expected = sum(len(tokenizer.encode(d["text"])) for d in curated["docs"].values())
    assert tokenized["tokens"] == expected + len(curated["docs"])  # + one end-of-document token each
    assert (curated["out"] / "curation_report.md").read_text().startswith("# Curation report")
    assert "documents/s" in curated["stdout"]


def test_a_killed_run_redoes_only_the_unfinished_shard(curated):
    tmp, out = curated["tmp"], curated["out"]
    final = out / "work" / "logs" / "09_redact_filter"
    before = {p.name: p.read_text() for p in (out / "jsonl").glob("*.jsonl")}
    untouched = (out / "work" / "1_read" / "00000.jsonl").stat().st_mtime_ns
    (final / "completions" / "00001").unlink()  # as if the run died in the last phase's shard 1
    (out / "jsonl" / "00001.jsonl").unlink()
    run = curate(tmp, tmp / "raw", "out")
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p.name: p.read_text() for p in (out / "jsonl").glob("*.jsonl")} == before
    assert (out / "work" / "1_read" / "00000.jsonl").stat().st_mtime_ns == untouched  # finished shards skipped


def test_pii_patterns_and_checksums():
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE88 3704 0044 0532 0130 00")
    text, counts = redact("mail a.b@c.io, v1.2.3.4 build 10.0.0.300, fe80:0000:0000:0000:0202:b3ff:fe1e:8329, "
                          "call (030) 1234 5678; for i in range(100): total += 3 * 14")
    assert text == ("mail <EMAIL>, v1.2.3.4 build 10.0.0.300, <IP_ADDRESS>, call <PHONE>; for i in range(100): "
                    "total += 3 * 14")
    assert counts == {"email": 1, "ip": 1, "phone": 1}
    assert redact("a.b@c.io", ["phone"]) == ("a.b@c.io", {})  # only the enabled types
    # numbers in the Python docs that once read as phones: a signed float, a zero-padded field
    kept = "'{:+f}'.format(3.14) gives '+3.140000'; in the form '+000000120'"
    assert redact(kept) == (kept, {})
    assert redact("call +14155552671 or +44 20 7946 0958") == ("call <PHONE> or <PHONE>", {"phone": 2})


def test_config_errors_name_the_key(tmp_path):
    from megatron_domain.config import ConfigError
    from megatron_domain.data.curate.config import load_curate_config

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"inputs": [str(tmp_path / "missing")], "exact_dedup": {"unit": "words"},
                                "pii": {"types": ["email", "dna"]}, "workerz": 2}))
    with pytest.raises(ConfigError) as info:
        load_curate_config(str(path))
    text = str(info.value)
    assert "workerz: unknown key; did you mean 'workers'?" in text
    path.write_text(json.dumps({"inputs": [str(tmp_path / "missing")], "exact_dedup": {"unit": "words"},
                                "pii": {"types": ["email", "dna"]}}))
    with pytest.raises(ConfigError) as info:
        load_curate_config(str(path))
    text = str(info.value)
    assert "inputs[0]:" in text and "is not a folder" in text
    assert "exact_dedup.unit: 'words'; choose lines or sentences" in text and "pii.types: unknown dna" in text


def test_regex_word_tokenizer_agrees_with_datatrove_spacy_on_prose():
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from megatron_domain.data.curate.steps import RegexWordTokenizer

    ours, spacy_words = RegexWordTokenizer(), load_word_tokenizer("en")
    texts = [prose(i) for i in range(5)] + [
        "Reset the printer, then wait (about 30 seconds) before you print again. Is the tray closed? Yes!",
        "The error code E-42 means: the toner cartridge is empty... Replace it; the manual says so."]
    for text in texts:
        assert ours.word_tokenize(text) == spacy_words.word_tokenize(text), text
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts + ["buy now " * 60, "# ## ### " * 40])]
    for make in (lambda lang: GopherQualityFilter(language=lang, min_doc_words=10),
                 lambda lang: GopherRepetitionFilter(language=lang)):
        assert [make(ours).filter(d) for d in docs] == [make("en").filter(d) for d in docs]
