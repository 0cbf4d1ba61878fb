"""Audio to features: decode -> resample -> loudness (silence, trim) -> frames, logmel; whole.py runs these on a
whole file (prepare's stores), stream.py in blocks (tagging, memory bounded)."""
