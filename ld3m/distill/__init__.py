"""Dataset distillation: matching objectives (`ld3m.distill.objectives`) and the loop."""
