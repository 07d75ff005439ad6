"""How the tool runs a cohort: locally in this process (cli) or on Ray actors (ray_*)."""
