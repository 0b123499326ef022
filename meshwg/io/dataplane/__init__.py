"""The data plane's shells: TUN and UDP, the compiled drain, the kernel socket filter, the driver that feeds a sans-IO core, and the plain WireGuard device."""
