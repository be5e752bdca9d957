"""Consent: signals → decisions → per-purpose verdicts → destination eligibility (DESIGN §6).

Everything in this package except :mod:`audiences.consent.store` is pure (no I/O):

* :mod:`~audiences.consent.settings` - :class:`ConsentSettings`, the ``[consent]`` configuration;
* :mod:`~audiences.consent.tcf` - a TCF v2.x TC string decoder and the TCF 2.2 purpose rules;
* :mod:`~audiences.consent.signals` - :func:`interpret`: the consent signals an event carries → decisions;
* :mod:`~audiences.consent.policy` - :func:`resolve`: a person's decisions → one :class:`Verdict` per purpose,
  and :func:`destination_consent`.
"""

from audiences.consent.policy import (
    Decision,
    DestinationVerdict,
    Verdict,
    destination_consent,
    region_kind,
    resolve,
)
from audiences.consent.settings import ConsentSettings
from audiences.consent.signals import Interpretation, SignalDecision, interpret
from audiences.consent.tcf import TcfError, TCString, allowed_purposes, decode

__all__ = [
    "ConsentSettings",
    "Decision",
    "DestinationVerdict",
    "Interpretation",
    "SignalDecision",
    "TCString",
    "TcfError",
    "Verdict",
    "allowed_purposes",
    "decode",
    "destination_consent",
    "interpret",
    "region_kind",
    "resolve",
]
