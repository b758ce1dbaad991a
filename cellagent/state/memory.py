"""MemoryStore: the Store in process memory, for unit tests and throwaway runs.

The contract is in ``state/base.py``. Rows are kept in the same stored form
as SqlStore's (state as its value, JSON fields as JSON text), so a record
that SqlStore could not store fails here too. One lock makes every method
atomic; there is no schema, so the store reports itself current.
"""

import dataclasses
import itertools
import logging
import threading

from cellagent import exception
from cellagent import objects
from cellagent.state import base

LOG = logging.getLogger(__name__)


class MemoryStore(base.Store):
    """The Store in a few dicts guarded by one lock; see ``state/base.py``."""

    def __init__(self, url="memory://", **kwargs):
        self.url = url
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._journal = {}         # id -> JournalEntry
        self._by_msg_uuid = {}     # msg_uuid -> id
        self._operations = {}      # (instance_uuid, operation) -> dict
        self._instances = {}       # instance_uuid -> stored column values

    def __repr__(self):
        return "<MemoryStore>"

    # -- schema -----------------------------------------------------------

    def schema_version(self):
        return base.SCHEMA_VERSION

    def check_schema(self):
        pass

    def sync_schema(self):
        return base.SCHEMA_VERSION

    def close(self):
        pass

    # -- journal ----------------------------------------------------------

    def begin_request(self, msg_uuid, method, instance_uuid, payload, start=False):
        now = base.utcnow()
        with self._lock:
            if msg_uuid in self._by_msg_uuid:
                return None
            entry = objects.JournalEntry(
                id=next(self._ids), msg_uuid=msg_uuid, method=method,
                instance_uuid=instance_uuid, payload=payload,
                status=(objects.JournalStatus.RUNNING if start
                        else objects.JournalStatus.RECEIVED),
                attempts=1 if start else 0, error="",
                created_at=now, updated_at=now)
            self._journal[entry.id] = entry
            self._by_msg_uuid[msg_uuid] = entry.id
            return dataclasses.replace(entry)

    def _change_entry(self, entry_id, change):
        """Replace an entry by ``change(entry)`` with updated_at stamped."""
        with self._lock:
            entry = self._journal.get(entry_id)
            if entry is None:
                raise exception.StateError(reason="no journal entry %s" % entry_id)
            entry = dataclasses.replace(change(entry), updated_at=base.utcnow())
            self._journal[entry_id] = entry
            return dataclasses.replace(entry)

    def start_attempt(self, entry_id):
        return self._change_entry(entry_id, lambda e: dataclasses.replace(
            e, status=objects.JournalStatus.RUNNING, attempts=e.attempts + 1))

    def finish_request(self, entry_id, status, error="", operations=()):
        base.check_final(status)
        with self._lock:
            entry = self._journal.get(entry_id)
            if entry is None:
                raise exception.StateError(reason="no journal entry %s" % entry_id)
            self._journal[entry_id] = dataclasses.replace(
                entry, status=status, error=error or "", updated_at=base.utcnow())
            for key in operations:
                held = self._operations.get(tuple(key))
                if held is not None:
                    held["status"] = base.OP_DONE

    def requeue(self, entry_id):
        self._change_entry(entry_id, lambda e: dataclasses.replace(
            e, status=objects.JournalStatus.RECEIVED))

    def _entries(self, keep, newest_first=False):
        with self._lock:
            ids = sorted(self._journal, reverse=newest_first)
            return [dataclasses.replace(self._journal[i]) for i in ids
                    if keep(self._journal[i])]

    def unfinished(self):
        return self._entries(lambda e: e.status in objects.JournalStatus.UNFINISHED)

    def list_requests(self, limit=50, status=None):
        entries = self._entries(lambda e: status is None or e.status == status,
                                newest_first=True)
        return entries[:limit]

    def get_request(self, entry_id_or_msg_uuid):
        key = entry_id_or_msg_uuid
        with self._lock:
            if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
                entry = self._journal.get(int(key))
            else:
                entry = self._journal.get(self._by_msg_uuid.get(key))
            return dataclasses.replace(entry) if entry is not None else None

    def purge_requests(self, older_than):
        with self._lock:
            old = [e for e in self._journal.values()
                   if e.status not in objects.JournalStatus.UNFINISHED
                   and e.updated_at < older_than]
            for entry in old:
                del self._journal[entry.id]
                del self._by_msg_uuid[entry.msg_uuid]
        return len(old)

    # -- operation claims -------------------------------------------------

    def claim_operation(self, instance_uuid, operation, msg_uuid):
        key = (instance_uuid, operation)
        with self._lock:
            held = self._operations.get(key)
            if held is None:
                self._operations[key] = {"instance_uuid": instance_uuid,
                                         "operation": operation, "msg_uuid": msg_uuid,
                                         "status": base.OP_CLAIMED}
                return True
            return held["msg_uuid"] == msg_uuid and held["status"] == base.OP_CLAIMED

    def finish_operation(self, instance_uuid, operation):
        with self._lock:
            held = self._operations.get((instance_uuid, operation))
            if held is not None:
                held["status"] = base.OP_DONE

    def get_operation(self, instance_uuid, operation):
        with self._lock:
            held = self._operations.get((instance_uuid, operation))
            return dict(held) if held is not None else None

    # -- instance map -----------------------------------------------------

    def put_instance(self, record):
        values = base.record_values(record)
        now = base.utcnow()
        with self._lock:
            old = self._instances.get(record.instance_uuid)
            values["created_at"] = old["created_at"] if old else now
            values["updated_at"] = now
            self._instances[record.instance_uuid] = values
            return base.to_record(values)

    def add_instance(self, record):
        values = base.record_values(record)
        with self._lock:
            old = self._instances.get(record.instance_uuid)
            if old is not None:
                return base.to_record(old)
            values["created_at"] = values["updated_at"] = base.utcnow()
            self._instances[record.instance_uuid] = values
        return None

    def get_instance(self, instance_uuid):
        with self._lock:
            row = self._instances.get(instance_uuid)
            return base.to_record(row) if row is not None else None

    def update_instance(self, instance_uuid, **fields):
        values = base.instance_values(fields)
        return self._change_instance(instance_uuid, values)

    def _change_instance(self, instance_uuid, values):
        with self._lock:
            row = self._instances.get(instance_uuid)
            if row is None:
                raise exception.InstanceNotFound(instance_id=instance_uuid)
            row.update(values, updated_at=base.utcnow())
            return base.to_record(row)

    def delete_instance(self, instance_uuid):
        return self._change_instance(instance_uuid, {
            "deleted": True, "state": objects.InstanceState.DELETED.value,
            "vm_state": objects.VmState.DELETED})

    def purge_deleted(self, older_than):
        with self._lock:
            old = [uuid for uuid, row in self._instances.items()
                   if row["deleted"] and row["updated_at"] < older_than]
            for uuid in old:
                del self._instances[uuid]
        return len(old)

    def list_instances(self, include_deleted=False, project_id=None,
                       updated_since=None, states=None):
        if states is not None:
            states = {objects.InstanceState(s).value for s in states}
        with self._lock:
            rows = [row for row in self._instances.values()
                    if (include_deleted or not row["deleted"])
                    and (project_id is None or row["project_id"] == project_id)
                    and (updated_since is None or row["updated_at"] >= updated_since)
                    and (states is None or row["state"] in states)]
            rows.sort(key=lambda row: (row["created_at"], row["instance_uuid"]))
            return [base.to_record(row) for row in rows]

    def list_instance_states(self):
        with self._lock:
            return [(row["instance_uuid"], row["backend_id"], objects.InstanceState(row["state"]))
                    for row in self._instances.values() if not row["deleted"]]

    def count_instances(self, include_deleted=False):
        with self._lock:
            return sum(1 for row in self._instances.values()
                       if include_deleted or not row["deleted"])
