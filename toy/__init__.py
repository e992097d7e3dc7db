"""The toy reasoning world: the embedded default task (task.py) and its character-level
tokenizer (tokenizer.py), small enough that the whole pipeline runs on a CPU in minutes."""
