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

LOKR = register(
    Method(
        "LOKR",
        LOKR_FACTORS,
        plan_lokr,
        lokr.delta_weight,
        linear_forward=lokr.linear_forward,
        linear_grads=lokr.linear_grads,
        conv_forward=lokr.conv_forward,
    )
)
LOHA = register(
    Method(
        "LOHA",
        LOHA_FACTORS,
        plan_loha,
        loha.delta_weight,
        linear_forward=loha.linear_forward,
        linear_grads=loha.linear_grads,
        conv_forward=loha.conv_forward,
    )
)
