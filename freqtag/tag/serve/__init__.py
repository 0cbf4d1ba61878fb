"""`freqtag serve`: a page and an HTTP API to tag music in the browser (:mod:`.command`, :mod:`.app`).

Kept free of heavy imports: ``freqtag --help`` imports :mod:`.command` only for its parser.
"""
