"""Wire protocol constants shared by the strategies (server) and the ClientApps (pure Python).

Both sides import this module, so a tag or a phase id is defined once; it imports nothing
heavy (a ClientApp process must stay lean).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Protocol tag of the gradient strategies (RobustSGD), sent in every train config.
GRADIENT_PROTOCOL = "flwr-byzantine/gradient-v1"
#: Protocol tag of the Newton strategies (Comrade, Giant).
NEWTON_PROTOCOL = "flwr-byzantine/newton-v1"

#: Newton phases (``newton-phase`` in the train config).
PHASE_DIRECTION = "direction"
PHASE_GRADIENT = "gradient"
#: Numeric phase ids clients echo in their MetricRecord as ``phase-id``.
PHASE_IDS = {PHASE_DIRECTION: 0, PHASE_GRADIENT: 1}


def check_protocol(config: Mapping[str, Any], expected: str, *, required: bool = True) -> None:
    """Raise ``ValueError`` unless ``config["protocol"]`` is ``expected`` (absent is fine if not ``required``)."""
    if "protocol" not in config and not required:
        return
    if config.get("protocol") != expected:
        raise ValueError(f"unsupported protocol {config.get('protocol')!r}; expected {expected!r}")
