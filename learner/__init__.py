"""The DeepSpeed learner. The only package that touches DeepSpeed."""
