"""Key pairs of the Amazon EC2 backend (``[ec2] key_pair_mode``).

Part of the EC2 backend (``ec2.py``): a build's OpenSSH public key is
imported once per key as the EC2 key pair ``cellagent-<digest>``
(``key_pair_name``) and never deleted. ``KeyPairMixin`` holds the
backend's key pair methods.
"""

import base64
import binascii
import contextlib
import hashlib
import logging
import threading

import botocore.exceptions

from cellagent.backends.ec2_support import error_code

LOG = logging.getLogger(__name__)


def key_pair_name(key_data):
    """The EC2 key pair name for an OpenSSH public key: ``cellagent-<digest>``.

    The digest is the SHA-256 of the key blob (the base64 field), as
    OpenSSH fingerprints it, so the same key with another comment is the
    same key pair; 20 hex digits (80 bits) keep names short and unique.
    """
    fields = key_data.split()
    blob = key_data.strip().encode()
    if len(fields) >= 2:
        with contextlib.suppress(binascii.Error, ValueError):
            blob = base64.b64decode(fields[1], validate=True)
    return "cellagent-" + hashlib.sha256(blob).hexdigest()[:20]


class KeyPairMixin:
    """The key pair methods of ``EC2Backend``, which inherits them.

    They rely on these attributes of the backend: ``_client`` (the boto3
    EC2 client), ``_cond`` (the lock its state is kept under), ``_keys``
    (the key pairs imported or found since start) and ``_key_imports``
    (key pair name -> Event while one thread imports it), both created by
    the backend, ``_opts.key_pair_mode`` and ``_opts.key_name``, and the
    methods ``_tags`` and ``_translate_errors``.
    """

    def _key_name(self, request):
        """The EC2 key pair for the build: its own key imported, else [ec2] key_name."""
        key_data = (request.key_data or "").strip()
        if self._opts.key_pair_mode != "import" or not key_data:
            return self._opts.key_name or ""
        name = key_pair_name(key_data)
        while True:
            with self._cond:
                if name in self._keys:
                    return name
                importing = self._key_imports.get(name)
                if importing is None:
                    importing = self._key_imports[name] = threading.Event()
                    break
            importing.wait()      # another build imports it; then look again
        try:
            self._import_key(name, key_data, request.instance_uuid)
            with self._cond:
                self._keys.add(name)
        finally:
            with self._cond:
                del self._key_imports[name]
            importing.set()
        return name

    def _import_key(self, name, key_data, instance_uuid):
        with self._translate_errors("importing the key pair of instance %s" % instance_uuid):
            try:
                self._client.import_key_pair(
                    KeyName=name, PublicKeyMaterial=key_data.encode(),
                    TagSpecifications=[{"ResourceType": "key-pair", "Tags": self._tags({})}])
            except botocore.exceptions.ClientError as exc:
                # The name is the key's digest: a key pair of that name is
                # this key, imported by another process or before a restart.
                if error_code(exc) != "InvalidKeyPair.Duplicate":
                    raise
                LOG.debug("Key pair %s exists already", name)
                return
        LOG.info("[instance: %(uuid)s] imported its public key as EC2 key pair %(name)s",
                 {"uuid": instance_uuid, "name": name})
