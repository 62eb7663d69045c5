"""Instruments: ways of measuring a stack against the unoptimized model (base.py: the extension point).

The built-ins register here with the same call a plug-in uses, in the order they measure, report and
are logged: fidelity, decode path, equivalence, benchmarks, judge, kernel loss, attribution
(docs/extending.md adds one).
"""

from qualgate.instruments.base import INSTRUMENTS, Instrument, instruments_for, register_instrument
from qualgate.instruments.benchmarks.instrument import Benchmarks
from qualgate.instruments.decode_path.instrument import DecodePath
from qualgate.instruments.equivalence.instrument import Equivalence
from qualgate.instruments.fidelity.instrument import Fidelity
from qualgate.instruments.judge.instrument import Judge
from qualgate.instruments.kernel_loss import KernelLoss

for _builtin in (Fidelity, DecodePath, Equivalence, Benchmarks, Judge, KernelLoss):
    register_instrument(_builtin)

from qualgate.attribution.instrument import Attribution  # noqa: E402  (imports the fidelity instrument)

register_instrument(Attribution)

__all__ = [
    "INSTRUMENTS",
    "Attribution",
    "Benchmarks",
    "DecodePath",
    "Equivalence",
    "Fidelity",
    "Instrument",
    "Judge",
    "KernelLoss",
    "instruments_for",
    "register_instrument",
]
