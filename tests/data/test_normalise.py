"""freqtag.data.normalise.normalise: the one ``(x - mean) / std`` of training, evaluation and tagging."""

from __future__ import annotations

import numpy as np
import torch

from freqtag.data.normalise import normalise


def test_normalise_takes_numpy_or_torch_float16_or_float32_and_zeroes_past_valid() -> None:
    x = np.random.default_rng(0).normal(size=(3, 4, 10)).astype(np.float16)
    want = (x.astype(np.float32) - np.float32(1.5)) / np.float32(2.0)
    cut = want.copy()
    cut[1, :, 4:] = 0.0
    cut[2] = 0.0
    for given in (x, torch.from_numpy(x), x.astype(np.float32), torch.from_numpy(x.astype(np.float32))):
        whole = normalise(given, 1.5, 2.0)
        assert whole.dtype == torch.float32 and whole.shape == (3, 4, 10)
        np.testing.assert_array_equal(whole.numpy(), want)
        for valid in (np.array([10, 4, 0]), torch.tensor([10, 4, 0])):
            np.testing.assert_array_equal(normalise(given, 1.5, 2.0, valid).numpy(), cut)
    assert normalise(x, 1.5, 2.0, device="cpu").device == torch.device("cpu")


def test_normalise_leaves_its_input_as_it_was() -> None:
    x = torch.ones(1, 2, 3, dtype=torch.float32)
    normalise(x, 1.0, 2.0, torch.tensor([1]))
    assert torch.equal(x, torch.ones(1, 2, 3))
