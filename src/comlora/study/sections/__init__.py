"""The reproduction page's sections, one function each: it reads the study's findings (``page.Page.study``, an
analysis.Study) and returns the section's named result, a dataclass whose fields fill the section's template in
prose.py (its ``template``). A new section is one such function (with its result), its template, and one entry of
report.SECTIONS; ``page`` holds what the sections share."""
