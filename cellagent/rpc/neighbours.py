"""Neighbour cell records, from a nova ``cells.json`` file (section 1.6).

The top-level keys of the file are the cell names (an inner ``name`` is
ignored, as nova ignores it). A record with ``is_parent: true`` is a parent:
reports and up-broadcasts go to every parent.
"""

import dataclasses
import json
import logging
import os
import threading

from cellagent import exception

LOG = logging.getLogger(__name__)

BAD_NAME_CHARS = "!.@"


@dataclasses.dataclass(frozen=True)
class CellRecord:
    name: str
    transport_url: str = dataclasses.field(repr=False)
    is_parent: bool = False
    weight_offset: float = 0.0
    weight_scale: float = 1.0
    api_url: str = ""


def check_cell_name(name):
    if not isinstance(name, str) or not name or any(c in name for c in BAD_NAME_CHARS):
        raise exception.ConfigurationError(
            reason="cell name %r must be non-empty and contain none of %s"
            % (name, " ".join(BAD_NAME_CHARS)))


def parse_cells(data, source="cells config"):
    """Records from the decoded JSON of a cells.json file."""
    if not isinstance(data, dict):
        raise exception.ConfigurationError(reason="%s is not a JSON object" % source)
    records = {}
    for name, value in data.items():
        check_cell_name(name)
        if not isinstance(value, dict) or not value.get("transport_url"):
            raise exception.ConfigurationError(
                reason="%s: cell %s has no transport_url" % (source, name))
        try:
            records[name] = CellRecord(
                name=name, transport_url=str(value["transport_url"]),
                is_parent=bool(value.get("is_parent", False)),
                weight_offset=float(value.get("weight_offset", 0.0)),
                weight_scale=float(value.get("weight_scale", 1.0)),
                api_url=str(value.get("api_url") or ""))
        except (TypeError, ValueError) as e:
            raise exception.ConfigurationError(
                reason="%s: cell %s: %s" % (source, name, e))
    return records


class Neighbours:
    """This cell's parents and children; re-reads the file when it changes."""

    def __init__(self, path=None, records=None):
        self._path = path
        self._lock = threading.Lock()
        self._mtime = None
        self._records = dict(records or {})
        if path:
            self._load()

    def _load(self):
        try:
            mtime = os.stat(self._path).st_mtime_ns
        except OSError as e:
            raise exception.ConfigurationError(
                reason="cannot read cells_config %s: %s" % (self._path, e.strerror))
        if mtime == self._mtime:
            return
        try:
            with open(self._path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise exception.ConfigurationError(
                reason="cannot parse cells_config %s: %s" % (self._path, e))
        self._records = parse_cells(data, self._path)
        self._mtime = mtime
        LOG.info("Loaded %(n)d neighbour cell records from %(path)s: parents %(p)s, "
                 "children %(c)s", {"n": len(self._records), "path": self._path,
                                    "p": sorted(self.parent_names()),
                                    "c": sorted(self.child_names())})

    def refresh(self):
        """Re-read the file if it changed; a broken edit keeps the old records."""
        if not self._path:
            return
        with self._lock:
            try:
                self._load()
            except exception.ConfigurationError as e:
                LOG.error("Keeping the previous cell records: %s", e)

    def replace(self, records):
        """Use ``records`` ({name: CellRecord}) from now on (the top merges
        its database records with the file and hands the result here)."""
        with self._lock:
            self._records = dict(records)

    def all(self):
        return dict(self._records)

    def get(self, name):
        return self._records.get(name)

    def parents(self):
        return [r for r in self._records.values() if r.is_parent]

    def children(self):
        return [r for r in self._records.values() if not r.is_parent]

    def parent_names(self):
        return [r.name for r in self.parents()]

    def child_names(self):
        return [r.name for r in self.children()]

    def neighbour(self, name, direction):
        """The record of ``name`` among parents (up) or children (down)."""
        rec = self._records.get(name)
        if rec is None or rec.is_parent != (direction == "up"):
            raise exception.CellRoutingInconsistency(
                reason="no %s cell named %s" % (
                    "parent" if direction == "up" else "child", name))
        return rec
