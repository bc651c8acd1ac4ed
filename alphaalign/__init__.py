"""alphaalign: safety alignment of language models with reinforcement learning on verifiable rewards."""

__version__ = "0.1.0"
