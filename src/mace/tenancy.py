"""Tenants: who a request or a feedback sample speaks for, and which adapter lineage serves and learns it.

A tenant is an API key's `tenant` (by default the key's name), or `KEY_TENANT/user` when a key with
the `act_for_users` scope sends OpenAI's `user` field; on a loopback server without keys, `user` alone
names it. The shared lineage, `SHARED` (""), serves requests without a tenant, and every request
under `train.tenancy = "shared"`.

Names are checked here, once, because they become directory names under the data dir: one or two
segments of letters, digits and `_ . @ -`, none starting with a dot, so no name escapes its directory.
"""

from __future__ import annotations

import re
from pathlib import Path

SHARED = ""  # the shared lineage: requests without a tenant
MAX_SEGMENT_CHARS = 64
# Not starting with '.' (no '..', no hidden directory) nor '_' (labels such as `_other` on /metrics).
_SEGMENT = re.compile(rf"[A-Za-z0-9@-][A-Za-z0-9_.@-]{{0,{MAX_SEGMENT_CHARS - 1}}}")


class InvalidTenant(ValueError):
    """A tenant or user name that cannot name a lineage."""


def check_segment(name: str, what: str = "user") -> str:
    """`name` if it is one valid segment (a key's tenant, or an end user's id); InvalidTenant otherwise."""
    if not _SEGMENT.fullmatch(name):
        raise InvalidTenant(f"{what} {name[:80]!r} is not a valid name: use 1-{MAX_SEGMENT_CHARS} letters, digits "
                            "or '_ . @ -', not starting with '.' or '_'")
    return name


def check_tenant(name: str) -> str:
    """`name` if it names a lineage: SHARED, `tenant` or `tenant/user`; InvalidTenant otherwise."""
    if name == SHARED:
        return name
    segments = name.split("/")
    if len(segments) > 2:
        raise InvalidTenant(f"tenant {name[:80]!r} has more than two '/'-separated parts")
    for segment in segments:
        check_segment(segment, "tenant")
    return name


def for_user(key_tenant: str, user: str) -> str:
    """The tenant of end user `user` acting through a key whose tenant is `key_tenant`."""
    check_segment(user)
    return user if key_tenant == SHARED else f"{key_tenant}/{user}"


def acts_for(key_tenant: str, tenant: str) -> bool:
    """Whether a key of `key_tenant` that may act for users speaks for `tenant` (its own, or its users')."""
    return tenant == key_tenant or (key_tenant != SHARED and tenant.startswith(key_tenant + "/"))


def tenant_dir(root: Path, tenant: str) -> Path:
    """Where `tenant`'s lineage (its `adapters/` and `checkpoints/`) lives under `root`: `root` itself for
    SHARED (the layout of a server without tenants), `root/tenants/<key>` for a key's tenant, and
    `root/tenants/<key>/users/<user>` for its users' (a user named `adapters` stays out of its key's)."""
    check_tenant(tenant)
    if tenant == SHARED:
        return root
    key, _, user = tenant.partition("/")
    return root / "tenants" / key / "users" / user if user else root / "tenants" / key
