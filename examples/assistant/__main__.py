"""`python -m examples.assistant --help`, from the repository's root."""

from .service import main

main()
