"""Where to spend the bits: each layer's measured sensitivity to coding (sensitivity, calibrate)
and the per-layer sparsity plan for a bit budget (allocate)."""
