"""Upstream ``qmtl.services.gateway.submission`` (see :mod:`qmtl`)."""
