"""meshwg: a mesh VPN on a userspace, wire-compatible WireGuard data plane."""

__version__ = "0.1.0"
