"""Walking jaxprs in tests: every equation, including those of nested jaxprs (jit, custom_vjp,
scan and cond bodies)."""

import jax.extend


def jaxpr_eqns(jaxpr):
  """Yields every equation of `jaxpr` (a core.Jaxpr) and of the jaxprs in its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from jaxpr_eqns(sub)
