"""Upstream ``qmtl.foundation`` (see :mod:`qmtl`)."""
