"""Keys, wg-quick config files and the UAPI text codec (pure modules, no I/O)."""
