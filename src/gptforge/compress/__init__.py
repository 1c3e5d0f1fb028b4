"""Model compression from outside the model file: quantization (module swaps) and pruning (masks or smaller dense
layers), selected by a module-name filter, with a before/after report."""
