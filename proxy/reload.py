"""Holds the current route table; reload builds a new one and swaps it in one assignment."""

from __future__ import annotations

import logging
from pathlib import Path

from . import observe
from .errors import ConfigError
from .routes import RouteTable

log = logging.getLogger("llmproxy.reload")


class TableHolder:
    """`current` is read once per request; a request keeps the table it started with."""

    def __init__(self, table: RouteTable, folder: Path | str | None = None) -> None:
        self.current = table
        self.folder = Path(folder) if folder is not None else None

    def reload(self) -> bool:
        """Build a table from the folder; keep the old one when a file is bad."""
        if self.folder is None:
            return False
        try:
            table = RouteTable.from_dir(self.folder)
        except ConfigError as exc:
            log.error("reload failed, previous routes stay in service: %s", exc)
            observe.reloaded(False)
            return False
        self.current = table
        observe.reloaded(True)
        log.info("routes reloaded: %d route(s)", len(table.routes))
        return True
