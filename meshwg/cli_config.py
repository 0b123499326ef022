"""Config files for `meshwg` and `meshwg-signal`: TOML read with tomllib, merged under the command line.

Pure apart from reading the one file: the accepted keys come from the argparse parsers themselves (an option's
long name, or an optional positional's name), in a table per subcommand (`[serve]`, `[join]`, `[invite.create]`)
or at the top level, where a key serves every subcommand that has the option (`db`, `interface`) and takes the
value (`advertise-exit-node = true` for join's flag, `= "off"` for set's on|off). Values go
through each action's own `type` and `choices`, so the file is checked as the flags are; every mistake is one
ConfigError line naming the file, the line and the key. Precedence: command line > deeper table > top level >
the parser's defaults.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tomllib

MAX_BYTES = 1 << 20  # a config file is a few hundred bytes; refuse to read a log file named by mistake
SECRET_KEYS = ("invite",)  # keys whose value must not be readable by other users
_NOT_GIVEN = object()


class ConfigError(ValueError):
    """One line: `FILE:LINE: [table] key: what is wrong` (the line when it is known)."""

    def __init__(self, filename: str, line: int | None, text: str):
        where = f"{filename}:{line}" if line else filename
        # Values and keys come from the file: never let one of them break the message over lines.
        super().__init__(f"{where}: {text}".replace("\r", "\\r").replace("\n", "\\n"))


# --- the keys the parsers accept --------------------------------------------------------------------------------


class _Node:
    """One parser of the tree: its keys (name -> action) and its subcommands (name -> _Node)."""

    def __init__(self, parser: argparse.ArgumentParser, path: tuple[str, ...]):
        self.parser, self.path = parser, path
        self.keys: dict[str, argparse.Action] = {}
        self.children: dict[str, _Node] = {}
        self.sub_dest: str | None = None
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                self.sub_dest = action.dest
                for name, child in action._name_parser_map.items():
                    self.children[name] = _Node(child, path + (name,))
            elif _kind(action) is not None:
                for key in _key_names(action):
                    self.keys[key] = action

    def subtree(self):
        yield self
        for child in self.children.values():
            yield from child.subtree()

    def table_name(self) -> str:
        return f"[{'.'.join(self.path)}] " if self.path else ""


def _key_names(action: argparse.Action) -> list[str]:
    if action.option_strings:
        names = [o[2:] for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):  # `x = false`, not `no-x = true`
            names = [n for n in names if not n.startswith("no-")]
        return names
    return [action.dest.replace("_", "-")]


def _kind(action: argparse.Action) -> str | None:
    """How a file value maps to this action, or None: not settable from a file."""
    if action.dest in ("help", "config_file") or action.required:
        return None  # required ones are checked by argparse before the file is read
    if not action.option_strings and action.nargs not in ("?", "*"):
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"
    if isinstance(action, argparse._StoreConstAction):
        return "flag"  # store_true, store_false, store_const: true gives the flag
    if isinstance(action, argparse._CountAction):
        return "count"
    if isinstance(action, argparse._AppendAction):  # append and extend
        return "list"
    if type(action) is argparse._StoreAction:
        return "value"
    return None  # version, help, custom actions


# --- values -----------------------------------------------------------------------------------------------------


def _type_name(value) -> str:
    for t, name in ((bool, "a boolean"), (int, "a whole number"), (float, "a number"), (str, "a string"),
                    (list, "a list"), (dict, "a table")):
        if isinstance(value, t):
            return name
    return "a date or time"


class _Bad(Exception):
    """A value refused: the message without file, line or key."""


def _scalar(action: argparse.Action, value):
    """One TOML scalar through the action's type and choices, as argparse treats one command-line word."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad(f"expected a string or a number, not {_type_name(value)}")
    try:
        text = value if isinstance(value, str) else str(value)
    except ValueError:  # an integer too long to print (more than 4300 digits)
        raise _Bad("invalid value: number too long") from None
    try:
        out = text if action.type is None else action.type(text)
    except argparse.ArgumentTypeError as exc:
        raise _Bad(f"invalid value {_short(value)}: {exc}") from None
    except (TypeError, ValueError, OverflowError):  # argparse's own words for these
        name = getattr(action.type, "__name__", repr(action.type))
        raise _Bad(f"invalid value {_short(value)}: invalid {name} value: {_short(text)}") from None
    if action.choices is not None and out not in action.choices:
        raise _Bad(f"invalid value {_short(value)} (choose from {', '.join(map(repr, action.choices))})")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _items(action: argparse.Action, value) -> list:
    """An append/extend option: a TOML array (or one scalar, as one item) of what `nargs` wants per item."""
    values = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._ExtendAction):
        return [_scalar(action, v) for v in values]
    return [_store(action, v) for v in values]  # append: one item per occurrence of the flag


def _store(action: argparse.Action, value):
    """What one occurrence of a `store` action leaves, given the file's value."""
    nargs = action.nargs
    if nargs in (None, "?"):
        return _scalar(action, value)
    if not isinstance(value, list):
        raise _Bad(f"expected a list, not {_type_name(value)}")
    if nargs == "+" and not value or isinstance(nargs, int) and len(value) != nargs:
        raise _Bad(f"expected {'at least one item' if nargs == '+' else f'{nargs} items'}, not {len(value)}")
    return [_scalar(action, v) for v in value]


def convert(action: argparse.Action, value):
    """The namespace value the file's `value` stands for; _Bad when refused."""
    kind = _kind(action)
    if kind in ("flag", "bool"):
        if not isinstance(value, bool):
            raise _Bad(f"expected true or false, not {_type_name(value)}")
        if kind == "bool":
            return value
        return action.const if value else action.default
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Bad(f"expected a whole number from 0, not {_short(value)}")
        return value
    if kind == "list":
        return _items(action, value)
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        return _store(action, value)
    if isinstance(value, list):
        raise _Bad(f"expected one value, not {_type_name(value)}")
    return _scalar(action, value)


# --- the file ---------------------------------------------------------------------------------------------------


class Config:
    """A checked file: per table path, key -> [(node, action, converted value)] for every parser that has it."""

    def __init__(self, filename: str, tables: dict, secrets: bool):
        self.filename, self.tables, self.secrets = filename, tables, secrets


def read(path: str, explicit: bool) -> tuple[bytes, int] | None:
    """The file's bytes and mode; None when a default file is missing. ConfigError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        if not explicit:
            return None
        raise ConfigError(path, None, "cannot read: no such file") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(path, None, f"larger than {MAX_BYTES} bytes: not a config file")
    return data, mode


def load(parser: argparse.ArgumentParser, data: bytes, filename: str) -> Config:
    """Parse and check the whole file against the parser tree (every table, not only the command run now)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(filename, data[:exc.start].count(b"\n") + 1, "not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _decode_error(filename, exc) from None
    except ValueError:  # tomllib lets int() refuse an integer past 4300 digits
        raise ConfigError(filename, None, "not valid TOML: a number too long") from None
    except RecursionError:
        raise ConfigError(filename, None, "not valid TOML: nested too deep") from None
    tables: dict = {}
    lines = _KeyLines(text)
    _check_table(_Node(parser, ()), doc, tables, lines, filename)
    return Config(filename, tables, secrets=any(k in t for t in tables.values() for k in SECRET_KEYS))


_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _decode_error(filename: str, exc) -> ConfigError:
    msg = str(exc)
    m = _POSITION.search(msg)
    line = getattr(exc, "lineno", None) or (int(m.group(1)) if m else None)
    if m:
        msg = msg[:m.start()] + f" (column {m.group(2)})"
    return ConfigError(filename, line, f"not valid TOML: {msg}")


def _check_table(node: _Node, table: dict, out: dict, lines, filename: str) -> None:
    known = {k: [] for n in node.subtree() for k in n.keys}
    for n in node.subtree():
        for key, action in n.keys.items():
            known[key].append((n, action))
    entries = out.setdefault(node.path, {})
    for key, value in table.items():
        line = lines.find(node.path, key)
        if key in node.children:
            if not isinstance(value, dict):
                raise ConfigError(filename, line, f"[{'.'.join(node.path + (key,))}]: expected a table, "
                                                  f"not {_type_name(value)}")
            _check_table(node.children[key], value, out, lines, filename)
            continue
        if key not in known:
            raise ConfigError(filename, line, node.table_name() + _unknown(key, value, node, known))
        # A key several commands share serves each that takes its value, converted by that command's own type
        # (`advertise-exit-node`: a flag for join, on|off for set); refused only when it fits none of them.
        converted, refused = [], {}
        for n, action in known[key]:
            try:
                converted.append((n, action, convert(action, value)))
            except _Bad as exc:
                refused.setdefault(str(exc), []).append(" ".join(n.path))
        if not converted:
            raise ConfigError(filename, line, f"{node.table_name()}{key}: {_refusals(refused)}")
        entries[key] = converted


def _refusals(refused: dict) -> str:
    """Why no command took the value: the one reason, or each command's (where they differ)."""
    if len(refused) == 1:
        return next(iter(refused))
    return "fits none of its commands: " + "; ".join(f"{', '.join(cmds)}: {why}" for why, cmds in refused.items())


def _unknown(key: str, value, node: _Node, known: dict) -> str:
    what = "table" if isinstance(value, dict) else "key"
    names = list(node.children) if what == "table" else list(known)
    near = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown {what} {key!r}{hint}"


class _KeyLines:
    """Where a key is assigned, found in the text (tomllib gives no positions for keys): best effort, None when a
    dotted key or an inline table hides it."""

    _HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")

    def __init__(self, text: str):
        self.where: dict = {}
        table: tuple = ()
        for number, raw in enumerate(text.splitlines(), 1):
            header = self._HEADER.match(raw)
            if header:
                parts = tuple(_unquote(p.strip()) for p in header.group(1).split("."))
                for i in range(1, len(parts) + 1):  # [a.b] also names table b inside a
                    self.where.setdefault((parts[:i - 1], parts[i - 1]), number)
                table = parts
                continue
            key = self._KEY.match(raw)
            if key:
                self.where.setdefault((table, _unquote(key.group(1))), number)

    def find(self, path: tuple, key: str) -> int | None:
        return self.where.get((path, key))


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


# --- merging under the command line -----------------------------------------------------------------------------


def run_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[_Node]:
    """The parsers the command line went through, outermost first."""
    node = _Node(parser, ())
    nodes = [node]
    while node.sub_dest and getattr(args, node.sub_dest, None) in node.children:
        node = node.children[getattr(args, node.sub_dest)]
        nodes.append(node)
    return nodes


def given_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations the command line itself set: the same parse with every default taken away."""
    saved = []
    for node in _Node(parser, ()).subtree():
        saved.append((node.parser, None, node.parser._defaults))
        node.parser._defaults = {}
        for action in node.parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                saved.append((node.parser, action, action.default))
                # Positionals take their default through the type: an object marks "not given" without it.
                action.default = argparse.SUPPRESS if action.option_strings else _NOT_GIVEN
    try:
        ns = parser.parse_args(argv)
    finally:
        for p, action, default in reversed(saved):
            if action is None:
                p._defaults = default
            else:
                action.default = default
    return {dest for dest, value in vars(ns).items() if value is not _NOT_GIVEN}


def apply(parser: argparse.ArgumentParser, config: Config, args: argparse.Namespace, given: set[str],
          exclusive: tuple = ()) -> None:
    """Set the file's values for the command run, under what the command line gave. `exclusive`: groups of
    dests that are one setting given different ways (an invite or its file): one given hides the file's others."""
    path = run_path(parser, args)
    groups = [set(g) for g in exclusive] + [{a.dest for a in g._group_actions}
                                            for n in path for g in n.parser._mutually_exclusive_groups]
    given = given | {d for g in groups if g & given for d in g}
    on_path = {id(n.parser) for n in path}
    for depth in range(len(path)):  # top level first: deeper tables override it
        for entries in config.tables.get(path[depth].path, {}).values():
            # The innermost parser of this command that has the key decides its type.
            mine = [(len(n.path), action, value) for n, action, value in entries if id(n.parser) in on_path]
            if not mine:
                continue  # a shared key this command has no use for
            _, action, value = max(mine, key=lambda e: e[0])
            if action.dest not in given:
                setattr(args, action.dest, value)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, default_path: str, warn,
               exclusive: tuple = (), given_elsewhere: set[str] = frozenset()) -> argparse.Namespace:
    """argparse's parse, then the config file (--config FILE, else default_path if it exists) under it.
    ConfigError for a bad file; `warn(line)` for a secret readable by other users. `given_elsewhere`: dests set
    by something the file must not override either (an environment variable)."""
    args = parser.parse_args(argv)
    explicit = getattr(args, "config_file", None)
    path = default_path if explicit is None else explicit
    got = read(path, explicit=explicit is not None)
    args.config_file = path if got else None
    if got is None:
        return args
    data, mode = got
    config = load(parser, data, path)
    if config.secrets and mode & 0o044:
        warn(f"warning: {path} holds the invite and other users can read it (chmod 600 {path})")
    apply(parser, config, args, given_dests(parser, argv) | set(given_elsewhere), exclusive)
    return args


def share_options(parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> None:
    """Copy the top-level options `dests` onto every subcommand, so they are accepted after it too; the copies
    have no default, so they never undo what the outer level parsed."""
    shared = [a for a in parser._actions if a.dest in dests]
    for node in list(_Node(parser, ()).subtree())[1:]:
        have = {o for a in node.parser._actions for o in a.option_strings}
        for a in shared:
            if not set(a.option_strings) & have:
                node.parser.add_argument(*a.option_strings, dest=a.dest, default=argparse.SUPPRESS, type=a.type,
                                         choices=a.choices, metavar=a.metavar, help=a.help)


class LazyVersion(argparse.Action):
    """`--version` whose text is computed only when asked (package metadata costs a few milliseconds)."""

    def __init__(self, option_strings, text, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show the version and exit")
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(self.text() + "\n", sys.stdout)  # stdout, as argparse's own version action
        parser.exit()


def package_version() -> str:
    """The installed meshwg distribution's version (a source tree not installed: the package's own)."""
    import importlib.metadata  # lazily: it pulls in email and socket

    try:
        return importlib.metadata.version("meshwg")
    except importlib.metadata.PackageNotFoundError:
        from meshwg import __version__
        return __version__
