"""The named seed salts: one place, all distinct, and used where the streams are drawn."""

from __future__ import annotations

import re
from pathlib import Path

from flwr_byzantine import seeds

ROOT = Path(__file__).resolve().parents[1]


def test_salts_are_distinct():
    assert len(set(seeds.SALTS.values())) == len(seeds.SALTS), seeds.SALTS


def test_no_unnamed_hex_salt_in_default_rng_calls():
    """A seed list like ``default_rng([seed, 0xB12])`` must use a name from flwr_byzantine.seeds."""
    pattern = re.compile(r"default_rng\(\[[^\]]*0x[0-9A-Fa-f]+")
    offenders = [str(p.relative_to(ROOT)) for folder in ("flwr_byzantine", "clients", "server_app")
                 for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_client_seed():
    assert seeds.client_seed(2, 5) == 2 * seeds.CLIENT_STRIDE + 5
