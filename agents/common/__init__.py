"""Training code that every learner shares: typed configs (YAML + command line), checkpoints, run folders and
logging, data-parallel helpers, seeding and learning-rate schedules. Nothing here knows a model or a loss."""
