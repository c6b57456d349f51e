"""Hydra sweeper plugin shipped with landmark_unet (lives in the ``hydra_plugins`` namespace, as Hydra requires)."""
