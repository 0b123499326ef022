"""Placeholder: the signal_server issue fills this in."""


def main(argv=None) -> int:
    print("meshwg-signal: not built yet")
    return 1
