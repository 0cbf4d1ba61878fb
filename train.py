"""Train one model: `python train.py model=freq_dep loss=weighted` (configs in conf/)."""

from freqtag.train.main import main

if __name__ == "__main__":
    main()
