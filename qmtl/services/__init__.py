"""Upstream ``qmtl.services``: the gateway (see :mod:`qmtl`)."""
