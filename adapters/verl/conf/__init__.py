"""Hydra config directory: ``disco_trainer.yaml`` (verl's ppo_trainer plus DisCO's defaults)."""
