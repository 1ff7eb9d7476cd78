"""LyCORIS methods in JAX: one record each (``lycoris_core.methods.Method``) with this framework's math.

Everything that differs between LoHa and LoKr is in its record; the layers, the adapted call
(``lycoris_jax.adapted``), the pytree API and the Linen transform look the method up by
``peft_type``. A new method is a plan (``lycoris_core``) and one record per framework:

>>> import lycoris_jax as lj
>>> lj.methods.method_for("LOKR").factor_names[:2]
('lokr_w1', 'lokr_w1_a')

``lycoris_torch.methods`` holds the torch twin's records under the same names.
"""

from __future__ import annotations

from lycoris_core.methods import Method, Registry
from lycoris_core.plan import LOHA_FACTORS, LOKR_FACTORS, plan_loha, plan_lokr
from lycoris_jax import loha, lokr

__all__ = ["LOHA", "LOKR", "METHODS", "Method", "method_for", "register"]

METHODS = Registry()
register, method_for = METHODS.register, METHODS.method_for

LOKR = register(Method.from_module("LOKR", LOKR_FACTORS, plan_lokr, lokr))
LOHA = register(Method.from_module("LOHA", LOHA_FACTORS, plan_loha, loha))
