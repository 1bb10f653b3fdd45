"""Upstream ``qmtl.runtime`` (see :mod:`qmtl`)."""
