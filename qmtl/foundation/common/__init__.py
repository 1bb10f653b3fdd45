"""Upstream ``qmtl.foundation.common`` (see :mod:`qmtl`)."""
