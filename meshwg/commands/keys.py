"""`meshwg genkey`, `meshwg pubkey`, `meshwg genpsk`: same input and output formats as wg(8)."""

from __future__ import annotations

import argparse
import os
import sys

from meshwg.config import keys
from meshwg.errors import UserError

# wg pubkey reads one 44-character key; allow a little whitespace around it, refuse anything bigger.
_MAX_STDIN = 4096


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_genkey(args: argparse.Namespace) -> int:
    print(keys.key_to_base64(keys.generate_private_key(os.urandom)))
    return 0


def run_genpsk(args: argparse.Namespace) -> int:
    print(keys.key_to_base64(keys.generate_psk(os.urandom)))
    return 0


def run_pubkey(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read(_MAX_STDIN + 1)
    if len(data) > _MAX_STDIN:
        raise UserError("pubkey: input too long (want one base64 private key on stdin)")
    try:
        text = data.decode("ascii").strip(" \t\r\n\v\f\0")
    except UnicodeDecodeError:
        raise UserError("pubkey: bad base64") from None
    try:
        private_key = keys.key_from_base64(text)
    except keys.KeyFormatError as err:
        raise UserError(f"pubkey: {err}") from None
    print(keys.key_to_base64(keys.public_key(private_key)))
    return 0


COMMANDS = {
    "genkey": ("Print a new private key (base64), like `wg genkey`.", _no_arguments, run_genkey),
    "pubkey": ("Read a private key on stdin, print its public key, like `wg pubkey`.", _no_arguments, run_pubkey),
    "genpsk": ("Print a new preshared key (base64), like `wg genpsk`.", _no_arguments, run_genpsk),
}
