"""forkrl: RL post-training for language models and tool-using agents, exploring where the model is uncertain."""
__version__ = "0.1.0"
