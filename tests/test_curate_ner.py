"""The model-based PII detector with a real spaCy pipeline: the test trains a small NER model
(names and cities) and saves it, as a user would save a fine-tuned one; the PII step then
redacts the patterns and the entities, counts both, and leaves the patterns' placeholders and
ordinary words alone. An unknown model is a config error naming `pii.ner_model`."""

from __future__ import annotations

import json
import random

import pytest

spacy = pytest.importorskip("spacy")
pytest.importorskip("datatrove")

NAMES = ["Maria Lopez", "John Smith", "Akira Tanaka", "Fatima Khan"]
CITIES = ["Berlin", "Lagos", "Osaka", "Denver"]
TEMPLATES = ["Please ask {p} about the printer in {c}.", "{p} replaced the toner cartridge in {c} yesterday.",
             "The ticket from {c} was closed by {p}.", "Send the firmware notes to {p}, who works in {c}.",
             "In {c}, {p} reset the network switch."]
PLAIN = ["Mail the report about error 1234.", "The paper tray is empty.", "Call support about error 5521.",
         "Replace the toner after 3000 pages.", "Error 4012 means the cable is loose.", "Mail <EMAIL> for a reset."]


def example(template: str, person: str, city: str) -> tuple[str, dict]:
    text = template.format(p=person, c=city)
    entities = [(text.index(person), text.index(person) + len(person), "PERSON"),
                (text.index(city), text.index(city) + len(city), "GPE")]
    return text, {"entities": sorted(entities)}


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory) -> str:
    from spacy.training import Example

    spacy.util.fix_random_seed(0)
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ner")
    for label in ("PERSON", "GPE"):
        ner.add_label(label)
    data = [example(t, p, c) for t in TEMPLATES[:4] for p in NAMES for c in CITIES]
    data += [(text, {"entities": []}) for text in PLAIN] * 4
    examples = [Example.from_dict(nlp.make_doc(text), annotations) for text, annotations in data]
    optimizer = nlp.initialize(lambda: examples)
    rng = random.Random(0)
    for _ in range(15):
        rng.shuffle(examples)
        for start in range(0, len(examples), 8):
            nlp.update(examples[start:start + 8], sgd=optimizer, drop=0.1)
    path = tmp_path_factory.mktemp("ner") / "pipeline"
    nlp.to_disk(path)
    return str(path)


def test_entities_and_patterns_are_redacted(ner_model):
    from datatrove.data import Document

    from megatron_domain.data.curate.steps import PiiRedactor

    text = TEMPLATES[4].format(p="John Smith", c="Osaka") + " Mail john.smith@example.com about error 4012."
    step = PiiRedactor(ner_model=ner_model)
    docs = list(step.run(iter([Document(text=text, id="a"), Document(text="The paper tray is empty.", id="b")])))
    assert docs[0].text == "In <LOCATION>, <PERSON> reset the network switch. Mail <EMAIL> about error 4012."
    assert docs[1].text == "The paper tray is empty."
    stats = step.stats.to_dict()["stats"]
    counts = {k: stats[k]["total"] if isinstance(stats[k], dict) else stats[k] for k in stats}
    assert {k: counts[k] for k in ("pii_person", "pii_location", "pii_email", "documents_with_pii")} == \
        {"pii_person": 1, "pii_location": 1, "pii_email": 1, "documents_with_pii": 1}


def test_unknown_ner_model_is_a_config_error(tmp_path):
    from megatron_domain.config import ConfigError
    from megatron_domain.data.curate.config import load_curate_config

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"inputs": [str(tmp_path)], "pii": {"ner_model": "xx_no_such_pipeline"}}))
    with pytest.raises(ConfigError, match="pii.ner_model: 'xx_no_such_pipeline' is neither an installed spaCy"):
        load_curate_config(str(path))


def test_rule_based_entities_and_placeholders_left_alone(tmp_path):
    from megatron_domain.data.curate.ner import NerRedactor

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": "Ada Lovelace"}, {"label": "PERSON", "pattern": "EMAIL"},
                        {"label": "EMPLOYEE", "pattern": [{"TEXT": {"REGEX": "^EMP-\\d{5}$"}}]}])
    nlp.to_disk(tmp_path / "rules")
    redactor = NerRedactor(str(tmp_path / "rules"), {"PERSON": "PERSON", "EMPLOYEE": "EMPLOYEE_ID"})
    text, counts = redactor.redact("Ada Lovelace (EMP-12345) wrote to <EMAIL> about EMAIL routing.")
    # "EMAIL" inside the e-mail placeholder is not an entity; the bare word is (the rules say so)
    assert text == "<PERSON> (<EMPLOYEE_ID>) wrote to <EMAIL> about <PERSON> routing."
    assert counts == {"person": 2, "employee_id": 1}
