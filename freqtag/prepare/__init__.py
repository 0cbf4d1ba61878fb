"""`freqtag prepare`: per-track spectrograms or audio files into one feature store."""
