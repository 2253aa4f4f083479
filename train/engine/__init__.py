"""The training machinery: loop, tasks, losses, optimizer, state, checkpoints, mesh, metrics."""
