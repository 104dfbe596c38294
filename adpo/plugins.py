"""The plugin registry: names of the form ``<scheme>:<rest>`` (models, data) and ``<scheme>`` (a radius, data), and
extra ``adpo`` commands, provided by packages beside the core.

A plugin is a :class:`Plugin` published under the ``adpo.plugins`` entry-point group (the bundled world publishes
its plugin object from pyproject.toml) or passed to :func:`register`. The core resolves such names only
here, so it never imports a plugin by name and runs unchanged without one. A plugin that fails to import is left out
with a warning; a name whose scheme no plugin claims is an ordinary path or hub id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from adpo.sources import ImageSource

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "adpo.plugins"
MODEL_KINDS = ("lvlm", "clip")


@dataclass(frozen=True)
class Plugin:
    """What one scheme provides; every callable takes the part after ``<scheme>:`` and imports what it needs lazily.

    ``model_kind(rest)`` says whether ``<scheme>:<rest>`` is an LVLM or a CLIP model (a ``UsageError`` for a name the
    plugin does not know); ``load_lvlm(rest, dtype)`` and ``load_clip(rest)`` return (model, processor);
    ``model_identity(rest)`` a key that changes when the weights do (resume checks). ``open_source(split, n)`` opens
    ``<scheme>`` / ``<scheme>:<split>`` as an image source (``split`` None for the bare name); ``check_data(split)``
    raises ``ValueError`` with the fix for a split it cannot open, cheaply (before any model loads). ``radius()`` is
    the value of the bare ``<scheme>`` written as an ε; ``default_data`` the data its models are meant for, used where
    a stage's data is left empty. ``command`` is a module with ``main(argv)`` run as ``adpo <scheme> …``.
    """

    scheme: str
    summary: str
    model_names: tuple[str, ...] = ()
    model_kind: Callable[[str], str] | None = None
    load_lvlm: Callable[..., tuple[Any, Any]] | None = None
    load_clip: Callable[[str], tuple[Any, Any]] | None = None
    model_identity: Callable[[str], str] | None = None
    open_source: Callable[[str | None, int | None], "ImageSource"] | None = None
    check_data: Callable[[str | None], None] | None = None
    radius: Callable[[], float] | None = None
    default_data: str | None = None
    command: str | None = None


_registered: dict[str, Plugin] = {}


def register(plugin: Plugin) -> None:
    """Add ``plugin`` (replacing one of the same scheme), e.g. from a test or a notebook."""
    _registered[plugin.scheme] = plugin


@lru_cache(maxsize=1)
def _published() -> dict[str, Plugin]:
    found: dict[str, Plugin] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = entry.load()
        except ImportError as error:  # e.g. the plugin's optional dependencies are not installed
            logger.warning("adpo plugin %r (%s) is unavailable: %s", entry.name, entry.value, error)
            continue
        if not isinstance(plugin, Plugin):
            logger.warning("adpo plugin %r (%s) is not an adpo.plugins.Plugin; ignored", entry.name, entry.value)
            continue
        found[plugin.scheme] = plugin
    return found


def plugins() -> dict[str, Plugin]:
    """Every available plugin by scheme: the published ones, then those registered in this process."""
    return {**_published(), **_registered}


def split_name(name: Any) -> tuple[Plugin, str | None] | None:
    """(plugin, rest) when ``name`` is ``<scheme>:<rest>`` (rest) or ``<scheme>`` (None) for an available plugin's
    scheme; None for anything else (a path, a hub id, a number)."""
    if not isinstance(name, str):
        return None
    scheme, colon, rest = name.partition(":")
    plugin = plugins().get(scheme)
    if plugin is None:
        return None
    return plugin, (rest if colon else None)


def model_plugin(name: str) -> tuple[Plugin, str] | None:
    """(plugin, rest) when ``name`` names one of a plugin's models (``<scheme>:<rest>``), else None; a scheme whose
    plugin loads no models, or a name it does not know, is a ``UsageError`` listing the ones it has."""
    from adpo.errors import UsageError

    found = split_name(name)
    if found is None or found[1] is None:
        return None
    plugin, rest = found
    if plugin.model_kind is None or rest not in plugin.model_names:
        known = ", ".join(f"{plugin.scheme}:{model}" for model in plugin.model_names) or "none"
        raise UsageError(f"{name!r} is no model of the {plugin.scheme!r} plugin; its models are: {known}")
    return plugin, rest


def plugin_default_data(model_name: str) -> str | None:
    """The data a plugin's model is meant for (its plugin's ``default_data``), where a stage's data is left empty;
    None for any other model."""
    named = model_plugin(model_name)
    return named[0].default_data if named is not None else None


def data_plugin(spec: str) -> tuple[Plugin, str | None] | None:
    """(plugin, split or None) when ``spec`` is a plugin's data (``<scheme>`` or ``<scheme>:<split>``), else None."""
    found = split_name(spec)
    if found is None or found[0].open_source is None:
        return None
    return found


def named_radius(text: str) -> float | None:
    """The ε a plugin gives its bare scheme name (``world``: the bundled world's working ε), else None."""
    found = split_name(text.strip().lower())
    if found is None or found[1] is not None or found[0].radius is None:
        return None
    return float(found[0].radius())


def radius_names() -> list[str]:
    """The bare names that stand for an ε (for help texts and errors)."""
    return sorted(plugin.scheme for plugin in plugins().values() if plugin.radius is not None)


def plugin_model_hint(kind: str | None = None) -> str:
    """For help texts and errors: ``", or a plugin's model ('toy:small', 'toy:large')"`` (the plugins' models of
    ``kind``, "lvlm" or "clip"; None: all); "" where no plugin has one."""
    names = [f"'{plugin.scheme}:{model}'" for plugin in plugins().values() if plugin.model_kind is not None
             for model in plugin.model_names if kind is None or plugin.model_kind(model) == kind]
    return f", or a plugin's model ({', '.join(names)})" if names else ""


def plugin_data_hint() -> str:
    """For help texts and errors: ``", or a plugin's data ('toy' / 'toy:<split>')"``; "" without such plugins."""
    names = [f"'{plugin.scheme}' / '{plugin.scheme}:<split>'" for plugin in plugins().values() if plugin.open_source]
    return f", or a plugin's data ({', '.join(names)})" if names else ""


def plugin_radius_hint() -> str:
    """For help texts: ``"; or a plugin's radius name ('toy')"``; "" without such plugins."""
    names = radius_names()
    return f"; or a plugin's radius name ({', '.join(repr(name) for name in names)})" if names else ""
