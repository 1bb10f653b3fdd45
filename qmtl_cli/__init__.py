"""The ``qmtl`` command line: a thin Typer layer over ``qmtl_core``."""
