"""The distil stage, one file per idea: ``stage`` (``distill(recipe, out_dir)``, the plan),
``context`` (what a run holds: device, process group, data, run dir), ``teacher``, ``student``
(its initial weights, the stage pairs, HARD's game), ``fit`` (the epoch loop of every role),
``resume`` (what a resumed run must match and reloads), ``qat`` (the QAT step), ``evaluate``,
``baseline`` (the student trained alone) and ``metrics`` (metrics.json).
"""
