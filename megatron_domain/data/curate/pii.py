"""PII redaction by pattern: each match of a type is replaced by its typed placeholder
(`<EMAIL>`, `<PHONE>`, ...). Numbers that merely look like identifiers are left alone where a
checksum says so: credit cards must pass the Luhn check, IBANs the ISO 13616 mod-97 check.

We write these patterns instead of using datatrove's PIIFormatter, which covers e-mail
addresses and IPs only; the model-based detector (names, addresses) is a separate, optional
step."""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# international (+country code), North American 3-3-4, or national with a trunk 0 (030 1234 5678);
# never inside a longer run of digit groups (a card number, a table of figures)
PHONE = re.compile(r"(?<![\w.+-])(?<!\d[ .-])(?:\+[1-9]\d{0,2}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,4}"
                   r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}|\(?0\d{1,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4})(?![\w-])(?![ .-]?\d)")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
US_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")

PII_TYPES = ("email", "phone", "ip", "credit_card", "iban", "national_id")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>",
                "iban": "<IBAN>", "national_id": "<NATIONAL_ID>"}


def luhn_valid(number: str) -> bool:
    """The Luhn checksum of the digits of `number` (credit card numbers pass it)."""
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return len(digits) >= 13 and total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters -> 10..35, mod 97 == 1."""
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def phone_valid(text: str) -> bool:
    """8-15 digits (E.164 allows at most 15; shorter runs are numbers in text, e.g. '+3.140000')."""
    return 8 <= sum(c.isdigit() for c in text) <= 15


def ip_valid(text: str) -> bool:
    """A syntactically valid IPv4 or IPv6 address (not a version number like 1.2.3.400)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# (type, pattern, validator): applied in this order, so a card number is not read as a phone
RULES: tuple[tuple[str, re.Pattern, Callable[[str], bool] | None], ...] = (
    ("email", EMAIL, None),
    ("iban", IBAN, iban_valid),
    ("credit_card", CARD, luhn_valid),
    ("national_id", US_SSN, None),
    ("ip", IPV6, ip_valid),
    ("ip", IPV4, ip_valid),
    ("phone", PHONE, phone_valid),
)


def redact(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, dict[str, int]]:
    """(text with every enabled PII type replaced by its placeholder, counts per type)."""
    counts = {t: 0 for t in types}
    for kind, pattern, valid in RULES:
        if kind not in counts:
            continue

        def replace(match: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        text = pattern.sub(replace, text)
    return text, {k: v for k, v in counts.items() if v}
