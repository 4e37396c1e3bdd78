"""The installed llmproxy version, for `--version` and the tracer's `service.version`."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("llmproxy")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
