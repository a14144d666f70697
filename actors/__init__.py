"""Ray actors: real-env rollouts and imagined rollouts. The only package besides learner/ that touches Ray."""
