"""Using a result: load it, decode, generate, wrap a model as a plain callable."""
