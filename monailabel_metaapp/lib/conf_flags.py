"""On/off conf keys read one way everywhere: `--conf KEY true|false` (also 1/0, yes/no, on/off)."""

from __future__ import annotations

OFF = ("false", "0", "no", "off")
ON = ("true", "1", "yes", "on")


def flag(conf: dict, key: str, default: bool) -> bool:
    """Whether conf key `key` is on; `default` when it is not set.

    Args:
        conf: the app's conf (strings from the command line, or values from a test).
        key: the conf key.
        default: its value when unset.
    """
    value = conf.get(key)
    return default if value is None else str(value).strip().lower() not in OFF
