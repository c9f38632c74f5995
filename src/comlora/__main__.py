"""python -m comlora (also: accelerate launch -m comlora train ...)."""

from .cli import main

main()
