"""``python -m nhb_core`` (also ``torchrun -m nhb_core train ...``)."""

from nhb_core.cli import main

if __name__ == "__main__":
    main()
