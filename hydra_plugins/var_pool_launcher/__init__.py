"""The project's Hydra launcher plugin (found by Hydra under the ``hydra_plugins`` namespace)."""
