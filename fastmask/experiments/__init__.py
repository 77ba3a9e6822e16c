"""Research experiments run by `fastmask run <name>` (see fastmask/cli.py's EXPERIMENTS) and the machinery they share
(``fastmask.experiments.runner``: typed configs, training loop, checkpoints and resume, results folder, plots)."""
