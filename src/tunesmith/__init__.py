"""tunesmith: fine-tune a pre-trained language model for your own task from one recipe file."""

__version__ = "0.1.0"
