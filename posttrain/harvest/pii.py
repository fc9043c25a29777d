"""Masking personal data in exported text: email addresses, phone numbers and key-like strings
(API keys, tokens), each replaced by a placeholder and counted.

Patterns, deliberately conservative where a false positive would damage the data (numbers in
math answers, dates, versions stay):
- email: `name@domain.tld` -> [EMAIL]
- phone: +country code then 2-5 digit groups (8-15 digits); North American `(415) 555-0132`
  or `415-555-0132`; a leading-0 local number with a separator (`030 1234567`) -> [PHONE]
- key: well-known prefixes (sk-, pk-, rk-, ghp_, gho_, hf_, xox?-, AKIA..., `Bearer x`) and any
  run of 32+ letters, digits, `_`, `-` that mixes letters and digits (tokens, hex secrets) -> [KEY]
"""

from __future__ import annotations

import re
from collections import Counter

_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_PHONE = "|".join([
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,5}(?![\w])",
    r"(?:(?<![\w(])\(\d{3}\) ?|(?<![\w.-])\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w]|[.-]\d)",
    r"(?<![\w.-])0\d{2,4}[ /-]\d{3,8}(?![\w]|[.-]\d)",
])
_KEY = "|".join([
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}",
    r"\b(?:ghp|gho|ghs|hf)_[A-Za-z0-9]{20,}",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"(?<=Bearer )[A-Za-z0-9._~+/-]{8,}=*",
    r"\b(?=[A-Za-z_-]*\d)(?=[\d_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b",
])
_ANY = re.compile(f"(?P<key>{_KEY})|(?P<email>{_EMAIL})|(?P<phone>{_PHONE})")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "key": "[KEY]"}
NAMES = {"email": ("email address", "email addresses"), "phone": ("phone number", "phone numbers"),
         "key": ("key-like string", "key-like strings")}


class Scrubber:
    """`scrub(text)` masks; `masked` counts what it masked, by kind."""

    def __init__(self) -> None:
        self.masked: Counter = Counter()

    def scrub(self, text: str) -> str:
        return _ANY.sub(self._mask, text)

    def _mask(self, match: re.Match) -> str:
        kind = match.lastgroup
        if kind == "phone" and not 7 <= sum(c.isdigit() for c in match.group()) <= 15:
            return match.group()
        self.masked[kind] += 1
        return PLACEHOLDERS[kind]

    def __str__(self) -> str:
        if not self.masked:
            return "masked nothing (no email addresses, phone numbers or key-like strings found)"
        return "masked " + ", ".join(f"{n} {NAMES[kind][n != 1]}" for kind, n in sorted(self.masked.items()))
