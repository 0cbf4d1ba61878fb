"""Audio to features: decoding, resampling, trimming and the recipes' log-mel, one streamed path."""
