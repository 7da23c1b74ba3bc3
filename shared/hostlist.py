"""Slurm's host list syntax: ``c[01-04,07],gpu1`` names c01, c02, c03, c04, c07 and gpu1.

Zero padding is kept (``c[08-10]`` gives c08, c09, c10), and several bracket groups in one name
multiply out (``r[1-2]n[1-2]`` gives r1n1, r1n2, r2n1, r2n2), as ``scontrol show hostnames`` does.
"""

from __future__ import annotations

import re

from shared.errors import InvalidInput

MAX_HOSTS = 1_000_000
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand(hostlist: str) -> list[str]:
    """Every host a host list names, in order, without repeats."""
    hosts: dict[str, None] = {}
    for name in _split_top_level(hostlist.strip()):
        for host in _expand_name(name, hostlist):
            hosts[host] = None
            if len(hosts) > MAX_HOSTS:
                raise InvalidInput(f"host list {hostlist!r} names more than {MAX_HOSTS} hosts")
    if not hosts:
        raise InvalidInput("empty host list")
    return list(hosts)


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_name(name: str, whole: str) -> list[str]:
    if "[" not in name:
        if "]" in name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise InvalidInput(f"bad host name {name!r} in host list {whole!r}")
        return [name]
    open_at = name.index("[")
    close_at = name.find("]", open_at)
    if close_at < 0:
        raise InvalidInput(f"unclosed '[' in host list {whole!r}")
    prefix, body, rest = name[:open_at], name[open_at + 1:close_at], name[close_at + 1:]
    if prefix and not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
        raise InvalidInput(f"bad host name {prefix!r} in host list {whole!r}")
    numbers: list[str] = []
    for item in body.split(","):
        match = _RANGE.fullmatch(item.strip())
        if not match:
            raise InvalidInput(f"bad range {item!r} in host list {whole!r}: want N or N-M")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise InvalidInput(f"range {item!r} in host list {whole!r} runs backwards")
        if int(high) - int(low) > MAX_HOSTS:
            raise InvalidInput(f"range {item!r} in host list {whole!r} names more than {MAX_HOSTS} hosts")
        width = len(low)
        numbers += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    tails = _expand_name(rest, whole) if rest else [""]
    if len(numbers) * len(tails) > MAX_HOSTS:  # counted before the product is built
        raise InvalidInput(f"host list {whole!r} names more than {MAX_HOSTS} hosts")
    return [f"{prefix}{n}{tail}" for n in numbers for tail in tails]
