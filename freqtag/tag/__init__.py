"""Tagging audio with trained models: loading (local, URL, Hub), predict, embed, rendering, taggrams, export, serve."""
