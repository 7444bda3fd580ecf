"""Inductor lowerings for the w4a8:: ops (installed as `inductor_w4a8.lowerings`).

Private Inductor APIs live here and only here, guarded by torch version.
"""
