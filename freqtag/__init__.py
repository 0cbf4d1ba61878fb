"""freqtag: the frequency-dependent CNN for music emotion and theme tagging."""
__version__ = "0.1.0"
