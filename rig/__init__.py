"""The `rig` command line and the configuration system that ties envs, rl, actors and learner."""
