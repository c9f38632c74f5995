"""python -m comlora (also: accelerate launch -m comlora train ...)."""

from comlora.cli import main

main()
