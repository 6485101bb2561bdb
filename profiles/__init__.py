"""Hardware profiles (installed as ``upop.profiles``): one data file per deployment target.

A profile names its target's size multiples, precision, reference shapes and latency model
(SPEC §3). The files and their validator arrive with the hardware-profile work; this
package lists what is installed.
"""

from __future__ import annotations

from importlib import resources


def available() -> list[str]:
    """Names of the profile files shipped in this package."""
    root = resources.files(__name__)
    return sorted(p.name.rsplit(".", 1)[0] for p in root.iterdir() if p.name.endswith((".toml", ".json")))
