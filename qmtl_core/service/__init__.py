"""The ``WorldService`` facade used by the CLI (local mode) and the HTTP server."""

from qmtl_core.service._service import LoadedWorld, ValidationResult, WorldService, WorldSummary

__all__ = ["WorldService", "LoadedWorld", "ValidationResult", "WorldSummary"]
