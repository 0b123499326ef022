"""The host's network configuration: addresses, routes, MTU, DNS and hooks (through `ip`, `wg`-quick semantics), and reconciling routes with the kernel."""
