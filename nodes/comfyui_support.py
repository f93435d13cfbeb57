"""Which ComfyUI versions the node pack supports, checked when ComfyUI loads it. No ComfyUI import here."""

from __future__ import annotations

import re

# The node pack uses ComfyUI's V3 node API (comfy_api.latest, comfy_entrypoint); tested against this release.
MIN_COMFYUI_VERSION = (0, 3, 64)


def _parse(version: str) -> tuple[int, ...] | None:
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return tuple(int(part) for part in match.groups()) if match else None


def comfyui_version_problem(version: str | None) -> str | None:
    """A one-line message if ``version`` (ComfyUI's ``comfyui_version.__version__``) is too old, else None."""
    parsed = _parse(version) if version else None
    if parsed is None or parsed >= MIN_COMFYUI_VERSION:
        return None  # an unreadable version (a dev build) is given the benefit of the doubt
    needed = ".".join(map(str, MIN_COMFYUI_VERSION))
    return (
        f"fewstep's nodes need ComfyUI ≥ {needed} (V3 node API); this is ComfyUI {version}: update ComfyUI "
        "(git pull, or the manager's 'Update ComfyUI')"
    )
