"""LyCORIS methods in PyTorch: one record each (``lycoris_core.methods.Method``) with this
framework's math (twin of ``lycoris_jax.methods``, same names).

>>> import lycoris_torch as lt
>>> lt.methods.method_for("LOHA").factor_names[:2]
('hada_w1_a', 'hada_w1_b')
"""

from __future__ import annotations

from lycoris_core.methods import Method, Registry
from lycoris_core.plan import LOHA_FACTORS, LOKR_FACTORS, plan_loha, plan_lokr
from lycoris_torch import loha, lokr

__all__ = ["LOHA", "LOKR", "METHODS", "Method", "method_for", "register"]

METHODS = Registry()
register, method_for = METHODS.register, METHODS.method_for

LOKR = register(Method.from_module("LOKR", LOKR_FACTORS, plan_lokr, lokr))
LOHA = register(Method.from_module("LOHA", LOHA_FACTORS, plan_loha, loha))
