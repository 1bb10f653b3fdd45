"""The upstream import paths, re-exported from qmtl_core (no second implementation).

Code written for upstream qmtl (the seed's shadow-domain guide, for one) imports from
``qmtl.services.gateway…`` and ``qmtl.runtime.sdk…``. Each module here only re-exports the one
qmtl_core object living under that name, so ``qmtl.runtime.sdk.runner.Runner is
qmtl_core.sdk.Runner`` and there is exactly one order gate and one context service:

=============================================== ================================================
upstream path                                   qmtl_core object
=============================================== ================================================
qmtl.services.gateway.models                    StrategySubmit (qmtl_core.gateway)
qmtl.services.gateway.submission.context_service ComputeContextService (qmtl_core.gateway)
qmtl.foundation.common.compute_key              ComputeContext (qmtl_core.domains)
qmtl.runtime.sdk                                the whole SDK (qmtl_core.sdk)
qmtl.runtime.sdk.runner                         Runner
qmtl.runtime.sdk.node                           Node, StreamInput
qmtl.runtime.transforms.publisher               TradeOrderPublisherNode
=============================================== ================================================

New code should import from ``qmtl_core`` directly.
"""
