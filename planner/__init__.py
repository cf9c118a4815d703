"""Placement planner (LP over tier fractions from a measured hardware profile).

Built by the planner issue. Until then every page lives on the DEVICE tier.
"""

__all__: list[str] = []
