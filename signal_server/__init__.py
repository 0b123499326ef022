"""signal_server: self-hosted coordination, STUN and end-to-end-encrypted relay for meshwg."""
