"""Hardware profiles (installed as ``upop.profiles``): the shipped TOML files, one per deployment target.

The schema, validation and loader are in the core (``upop.latency.hwprofile``), which reads these files as
package data; this package re-exports them so ``upop.profiles.load("a100")`` keeps working.
"""

from upop.latency.hwprofile import (SHIPPED, Alignment, Peaks, Profile, ProfileError, Shapes, available, load, parse, read_file,
                            validate)

__all__ = ["SHIPPED", "Alignment", "Peaks", "Profile", "ProfileError", "Shapes", "available", "load", "parse",
           "read_file", "validate"]
