"""The CNI config installer: chains ``ambient-cni`` into the node's primary CNI config.

Role: what the agent DaemonSet runs at start (and on drift): find the primary network config
the way kubelet/libcni does (the lexically first ``.conf``/``.conflist``/``.json`` file in the
conf dir), add our entry to its ``plugins[]`` (a lone ``.conf`` becomes a ``.conflist`` with
the same name and cniVersion, and the ``.conf`` is removed), and copy the plugin launcher into
the CNI bin dir with the absolute interpreter path baked in.  ``uninstall`` removes exactly
our entry and the launcher (a converted file stays a ``.conflist``); ``check`` reports drift.

Usage: ``python -m cni.install install|uninstall|check [--conf-dir /etc/cni/net.d]
[--bin-dir /opt/cni/bin] [--conf-name FILE] [--values FILE-or-JSON]``.
Exit codes: 0 done / no drift, 1 drift found (check), 2 error (message on stderr).

Invariants:
- ``merge``/``unmerge`` are pure and never mutate their input; everything that is not ours
  (other plugins, their order, unknown fields) is kept as it was.
- Our entry is the plugin with ``"type": "ambient-cni"``: installing replaces the first one in
  place and drops duplicates; with none it is appended (chained after the primary plugins).
- Installing twice is installing once: an unchanged file is not rewritten (runtimes watch the
  dir); every write is a temp file in the same dir plus an atomic rename.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni.plugin import DEFAULT_EXCLUDE, DEFAULT_RUN_DIR, PLUGIN_TYPE, PluginError, parse_conf

CONF_EXTENSIONS = (".conf", ".conflist", ".json")
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
LAUNCHER_NAME = PLUGIN_TYPE
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_TEMPLATE = os.path.join(SOURCE_ROOT, "cni", "bin", LAUNCHER_NAME)

DEFAULT_ENTRY: dict[str, Any] = {
    "type": PLUGIN_TYPE,
    "name": PLUGIN_TYPE,
    "plugin_log_level": "info",
    "cni_agent_run_dir": DEFAULT_RUN_DIR,
    "ambient_enabled": True,
    "exclude_namespaces": list(DEFAULT_EXCLUDE),
    "pod_namespace": "istio-system",
    "native_nftables": False,
    "agent_timeout_s": 30,
}


class InstallError(Exception):
    """The installer cannot proceed; the message says what is wrong and what to do."""


# ------------------------------------------------------------------ pure core


def is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def make_entry(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Our plugin entry: the defaults overridden by ``values`` (validated like the plugin)."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(DEFAULT_ENTRY))
    if unknown:
        raise InstallError(f"unknown field(s) in --values: {', '.join(unknown)}; known: "
                           f"{', '.join(DEFAULT_ENTRY)}")
    if values.get("type", PLUGIN_TYPE) != PLUGIN_TYPE:
        raise InstallError(f"--values may not change type (must be {PLUGIN_TYPE!r})")
    entry = {**copy.deepcopy(DEFAULT_ENTRY), **values}
    try:
        parse_conf({**entry, "cniVersion": "1.0.0"})
    except PluginError as exc:
        raise InstallError(f"invalid --values: {exc.msg} ({exc.details})") from None
    return entry


def _require_str(doc: dict[str, Any], key: str, where: str) -> str:
    val = doc.get(key)
    if not isinstance(val, str) or not val:
        raise InstallError(f"{where} has no {key!r} string; it is not a valid CNI network config")
    return val


def to_conflist(doc: dict[str, Any], where: str = "the config") -> dict[str, Any]:
    """A copy of ``doc`` as a conflist (a lone plugin config is wrapped, like Istio does)."""
    if "plugins" in doc:
        if not isinstance(doc["plugins"], list):
            raise InstallError(f"{where}: 'plugins' is not a list; fix the file")
        return copy.deepcopy(doc)
    if is_ours(doc):
        raise InstallError(f"{where} is an {PLUGIN_TYPE} config itself, not a primary CNI "
                           "config; remove it and install the primary CNI first")
    version = _require_str(doc, "cniVersion", where)
    name = _require_str(doc, "name", where)
    plugin = {k: copy.deepcopy(v) for k, v in doc.items() if k not in ("cniVersion", "name")}
    return {"cniVersion": version, "name": name, "plugins": [plugin]}


def merge(primary: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """``primary`` (conf or conflist) as a conflist with exactly one entry equal to ``entry``."""
    out = to_conflist(primary)
    plugins: list[Any] = []
    placed = False
    for plugin in out["plugins"]:
        if is_ours(plugin):
            if not placed:
                plugins.append(copy.deepcopy(entry))
                placed = True
            continue
        plugins.append(plugin)
    if not placed:
        plugins.append(copy.deepcopy(entry))
    out["plugins"] = plugins
    return out


def unmerge(primary: dict[str, Any]) -> dict[str, Any]:
    """``primary`` without any of our entries (a conflist stays a conflist)."""
    if "plugins" not in primary or not isinstance(primary["plugins"], list):
        return copy.deepcopy(primary)
    out = copy.deepcopy(primary)
    out["plugins"] = [p for p in out["plugins"] if not is_ours(p)]
    return out


def drift(primary: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """What differs from an installed state ('' list when ``primary`` is as installed)."""
    plugins = primary.get("plugins")
    if not isinstance(plugins, list):
        return ["the primary config is a lone plugin config, not a conflist with our entry"]
    ours = [p for p in plugins if is_ours(p)]
    if not ours:
        return [f"no {PLUGIN_TYPE} entry in plugins[]"]
    found = []
    if len(ours) > 1:
        found.append(f"{len(ours)} {PLUGIN_TYPE} entries (expected one)")
    if ours[0] != entry:
        keys = sorted(k for k in set(ours[0]) | set(entry) if ours[0].get(k) != entry.get(k))
        found.append(f"our entry differs in: {', '.join(keys)}")
    return found


def pick_primary(names: list[str]) -> str | None:
    """The config file a runtime would use: lexically first with a CNI extension."""
    candidates = sorted(n for n in names if n.endswith(CONF_EXTENSIONS))
    return candidates[0] if candidates else None


def conflist_name(name: str) -> str:
    """``10-x.conf``/``10-x.json`` -> ``10-x.conflist``."""
    base, ext = os.path.splitext(name)
    return name if ext == ".conflist" else base + ".conflist"


def render_launcher(template: str, python: str, source_root: str) -> str:
    """The launcher text with the interpreter (``-I``: ignore PYTHON* env) and root baked in."""
    lines = template.splitlines(keepends=True)
    if not lines or not lines[0].startswith("#!"):
        raise InstallError("the launcher template has no #! line; the checkout is damaged")
    if not os.path.isabs(python):
        raise InstallError(f"the interpreter path must be absolute, got {python!r}")
    marker = '_SOURCE_ROOT = ""'
    text = f"#!{python} -I\n" + "".join(lines[1:])
    if marker not in text:
        raise InstallError(f"the launcher template lacks {marker!r}; the checkout is damaged")
    return text.replace(marker, f"_SOURCE_ROOT = {json.dumps(source_root)}", 1)


# ------------------------------------------------------------------ file I/O


def _files(conf_dir: str) -> list[str]:
    try:
        return [n for n in os.listdir(conf_dir) if os.path.isfile(os.path.join(conf_dir, n))]
    except FileNotFoundError:
        raise InstallError(f"CNI config dir {conf_dir} does not exist: install the primary CNI "
                           "first (or pass --conf-dir)") from None


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except ValueError as exc:
        raise InstallError(f"{path} is not valid JSON ({exc}); fix or remove it, the container "
                           "runtime cannot use it either") from None
    if not isinstance(doc, dict):
        raise InstallError(f"{path} holds a JSON {type(doc).__name__}, not an object; fix or "
                           "remove it")
    return doc


def _atomic_write(path: str, data: str, mode: int) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def _primary_path(conf_dir: str, conf_name: str | None) -> str:
    if conf_name:
        path = os.path.join(conf_dir, conf_name)
        if not os.path.isfile(path):
            raise InstallError(f"--conf-name {conf_name}: no such file in {conf_dir}")
        return path
    name = pick_primary(_files(conf_dir))
    if name is None:
        raise InstallError(f"no CNI network config (*.conf, *.conflist, *.json) in {conf_dir}: "
                           "install the primary CNI first, then run this again")
    return os.path.join(conf_dir, name)


@dataclass
class Report:
    """What an install/uninstall did, or what check found (``changes`` empty = nothing)."""

    primary: str = ""
    changes: list[str] = field(default_factory=list)


def install(conf_dir: str = DEFAULT_CONF_DIR, bin_dir: str = DEFAULT_BIN_DIR,
            conf_name: str | None = None, values: Mapping[str, Any] | None = None,
            python: str = sys.executable, source_root: str = SOURCE_ROOT) -> Report:
    entry = make_entry(values)
    path = _primary_path(conf_dir, conf_name)
    report = Report(primary=path)
    doc = _load(path)
    merged = merge(doc, entry)
    target = path if "plugins" in doc else conflist_name(path)  # a .json may be a conflist
    if target != path and os.path.exists(target):
        raise InstallError(f"cannot convert {path} to {target}: that file exists already; "
                           "remove one of them")
    if target != path or merged != doc:
        mode = os.stat(path).st_mode & 0o777
        _atomic_write(target, _dumps(merged), mode)
        report.changes.append(f"wrote {target}")
        if target != path:
            os.unlink(path)
            report.changes.append(f"removed {path} (converted to {os.path.basename(target)})")
        report.primary = target
    if install_launcher(bin_dir, python, source_root):
        report.changes.append(f"wrote {os.path.join(bin_dir, LAUNCHER_NAME)}")
    return report


def install_launcher(bin_dir: str, python: str, source_root: str) -> bool:
    """Write the plugin launcher into ``bin_dir`` (absolute interpreter and source root baked
    in); returns whether the file changed."""
    with open(LAUNCHER_TEMPLATE, encoding="utf-8") as fh:
        text = render_launcher(fh.read(), python, source_root)
    dst = os.path.join(bin_dir, LAUNCHER_NAME)
    try:
        with open(dst, encoding="utf-8") as fh:
            if fh.read() == text and os.access(dst, os.X_OK):
                return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    os.makedirs(bin_dir, exist_ok=True)
    _atomic_write(dst, text, 0o755)
    return True


def uninstall(conf_dir: str = DEFAULT_CONF_DIR, bin_dir: str = DEFAULT_BIN_DIR,
              conf_name: str | None = None) -> Report:
    """Remove our entry from the primary config (and any other config file) and the launcher."""
    report = Report()
    if os.path.isdir(conf_dir):
        primary = _primary_path(conf_dir, conf_name) if conf_name else None
        names = sorted(_files(conf_dir))
        first = pick_primary(names)
        report.primary = primary or (os.path.join(conf_dir, first) if first else "")
        for name in names:
            path = os.path.join(conf_dir, name)
            if not name.endswith(CONF_EXTENSIONS):
                continue
            try:
                doc = _load(path)
            except InstallError:
                if path == primary:
                    raise
                continue  # not ours to judge; the runtime reports it
            cleaned = unmerge(doc)
            if cleaned != doc:
                _atomic_write(path, _dumps(cleaned), os.stat(path).st_mode & 0o777)
                report.changes.append(f"removed our entry from {path}")
    launcher = os.path.join(bin_dir, LAUNCHER_NAME)
    if os.path.exists(launcher):
        os.unlink(launcher)
        report.changes.append(f"removed {launcher}")
    return report


def check(conf_dir: str = DEFAULT_CONF_DIR, bin_dir: str = DEFAULT_BIN_DIR,
          conf_name: str | None = None, values: Mapping[str, Any] | None = None,
          python: str = sys.executable, source_root: str = SOURCE_ROOT) -> Report:
    """Drift findings: what ``install`` would change (empty ``changes`` = installed as asked)."""
    entry = make_entry(values)
    path = _primary_path(conf_dir, conf_name)
    report = Report(primary=path, changes=[f"{path}: {d}" for d in drift(_load(path), entry)])
    dst = os.path.join(bin_dir, LAUNCHER_NAME)
    with open(LAUNCHER_TEMPLATE, encoding="utf-8") as fh:
        want = render_launcher(fh.read(), python, source_root)
    try:
        with open(dst, encoding="utf-8") as fh:
            if fh.read() != want:
                report.changes.append(f"{dst} differs from this installer's launcher")
    except (FileNotFoundError, UnicodeDecodeError):
        report.changes.append(f"{dst} is missing")
    return report


# ------------------------------------------------------------------ CLI


def load_values(arg: str | None) -> dict[str, Any]:
    """``--values``: a JSON/YAML file path, or inline JSON (starting with ``{``)."""
    if not arg:
        return {}
    if arg.lstrip().startswith(("{", "[")):
        text = arg
    else:
        try:
            with open(arg, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise InstallError(f"--values {arg}: {exc.strerror}") from None
    import yaml  # only the installer needs it; YAML is a superset of JSON

    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InstallError(f"--values {arg[:60]} is not valid JSON/YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InstallError("--values must hold a mapping of our entry's fields")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cni.install", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("install", "uninstall", "check"))
    ap.add_argument("--conf-dir", default=DEFAULT_CONF_DIR)
    ap.add_argument("--bin-dir", default=DEFAULT_BIN_DIR)
    ap.add_argument("--conf-name", default=None,
                    help="the primary config file (default: lexically first, like kubelet)")
    ap.add_argument("--values", default=None,
                    help="our entry's fields: a JSON/YAML file or an inline JSON object")
    args = ap.parse_args(argv)
    try:
        if args.action == "uninstall":
            report = uninstall(args.conf_dir, args.bin_dir, args.conf_name)
        elif args.action == "install":
            report = install(args.conf_dir, args.bin_dir, args.conf_name,
                             load_values(args.values))
        else:
            report = check(args.conf_dir, args.bin_dir, args.conf_name, load_values(args.values))
            for line in report.changes:
                print(f"drift: {line}")
            print("ok: installed as configured" if not report.changes else
                  "run `python -m cni.install install` to repair")
            return 1 if report.changes else 0
    except (InstallError, OSError) as exc:
        print(f"ambient-cni install: error: {exc}", file=sys.stderr)
        return 2
    for line in report.changes or [f"{args.action}: nothing to do ({report.primary})"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
