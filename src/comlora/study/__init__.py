"""The reproduction study: ``experiments`` (``comlora study``: every experiment not yet recorded) and ``report``
(``comlora study-report``: docs/reproduction.md and its figures)."""
