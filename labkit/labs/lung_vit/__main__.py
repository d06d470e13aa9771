"""``python -m labkit.labs.lung_vit``: Lab 04's ViT run from a terminal or ``ray job submit`` (see :mod:`.command`).

The command lives in an importable module, so Ray pickles ``train_func`` by its name,
``labkit.labs.lung_vit.command.train_func``, and workers import it instead of unpickling ``__main__``."""
from labkit.labs.lung_vit.command import main

if __name__ == "__main__":
    main()
