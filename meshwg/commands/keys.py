"""Placeholder: the owning issue fills this module's COMMANDS."""

COMMANDS: dict = {}
