"""Adapters to other module-level quantizers: :mod:`.aimet` (AIMET QuantSim) and
:mod:`.brevitas`. Optional extras, not imported by ``qprep.quant``: import the one you use
(``from qprep.quant.adapters import aimet``); each raises ImportError with the install hint
when its package is missing."""
