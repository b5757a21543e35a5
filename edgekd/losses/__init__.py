"""The loss math, a leaf package: pure tensor functions (``terms``), each naming its paper, and
the registry of distillation methods built from them (``methods``). It imports nothing of
edgekd but its errors, so training, recipes, reports and HARD all import it downward."""
