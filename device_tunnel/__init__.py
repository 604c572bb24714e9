"""The device side of proxyorch's reverse tunnel: agent, automation runner, SDK (distribution
``proxyorch-agent``), plus the protocol core the node shares. See ``PROTOCOL.md``."""

__version__ = "0.1.0"  # the main project's version (a test holds the two pyproject files to it)
