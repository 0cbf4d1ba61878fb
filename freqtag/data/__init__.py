"""The data a run reads: MTG-Jamendo metadata, the feature store, loading and the DataModule, synthetic data, the dataset download."""
