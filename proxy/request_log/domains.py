"""The registrable domain of a request-log target, from the ICANN section of the public suffix list.

``a.b.example.co.uk:443`` -> ``example.co.uk``; an IP literal groups by its address; a name under
a TLD the list does not know (private-use ``.test``, ``.internal``, ...) by its last two labels;
a bare suffix or single label by itself. The list is the snapshot bundled with the
``publicsuffixlist`` package: nothing is fetched at run time.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

_PSL = PublicSuffixList(only_icann=True)


def split_target(target: str) -> str:
    """The host of ``host:port`` / ``[v6]:port`` (lower case, no trailing dot)."""
    host = target
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    return host.rstrip(".").lower()


@lru_cache(maxsize=65536)
def registrable_domain(target: str) -> str:
    """The grouping key of one target (see the module docstring)."""
    host = split_target(target)
    if not host:
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return _PSL.privatesuffix(host) or host
