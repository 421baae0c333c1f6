"""Post-hoc analysis of saved checkpoints: the Reaction value and what follows from it."""
