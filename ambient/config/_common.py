"""Shared helpers for the config parsers: YAML loading and small strict converters.

Every converter raises ``FieldError`` with a message that names the field; callers prefix the
entry ("workloads[2] (uid foo): ..."). Nothing here raises anything else on any input.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from ambient.model import IPAddress, IPNetwork


class FieldError(ValueError):
    """A field of a config entry is wrong; the message names it."""


def load_yaml_documents(text: str) -> tuple[list[Any], str | None]:
    """All YAML documents in ``text``; on a syntax error, the error (and no documents)."""
    try:
        return list(yaml.safe_load_all(text)), None
    except Exception as e:  # yaml errors, and anything odd the constructor hits
        return [], f"YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def load_yaml(text: str) -> tuple[Any, str | None]:
    try:
        return yaml.safe_load(text), None
    except Exception as e:
        return None, f"YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise FieldError(f"{name} {short(value)} is not a string")
    return value


def as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"{name} {short(value)} is not true/false")
    return value


def as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError(f"{name} {short(value)} is not a list")
    return value


def as_map(value: Any, name: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError(f"{name} {short(value)} is not a mapping")
    return value


def as_port(value: Any, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"{name} {short(value)} is not a port number")
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise FieldError(f"{name} {value} is out of range {lo}..65535")
    return value


def as_ip(value: Any, name: str) -> IPAddress:
    if not isinstance(value, str):
        raise FieldError(f"{name} {short(value)} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise FieldError(f"{name} {short(value)} is not an IP address") from None


def as_cidr(value: Any, name: str) -> IPNetwork:
    """``"10.0.0.0/8"`` or a bare IP (a single host)."""
    if not isinstance(value, str):
        raise FieldError(f"{name} {short(value)} is not an IP or CIDR")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise FieldError(f"{name} {short(value)} is not an IP or CIDR") from None


def check_keys(obj: dict[Any, Any], known: set[str] | frozenset[str], where: str = "") -> None:
    for k in obj:
        if k not in known:
            prefix = f"{where}: " if where else ""
            raise FieldError(f"{prefix}unknown field {short(k)}")


def enum_value(value: Any, name: str, choices: dict[str, str]) -> str:
    """Case- and underscore-insensitive enum spelling -> canonical name."""
    if isinstance(value, str):
        canon = choices.get(value.replace("_", "").replace("-", "").lower())
        if canon is not None:
            return canon
    want = "|".join(sorted(set(choices.values())))
    raise FieldError(f"{name} {short(value)} is not one of {want}")
