"""llmk_lab's Hydra launcher plugin: the jobs of a sweep as Ray tasks (ray_launcher.py)."""
