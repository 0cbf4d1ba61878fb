"""Tag audio: `python predict.py --ckpt RUN_DIR song.mp3 music/ --top 5` (same options as `freqtag predict`)."""

import sys

from freqtag.tag.predict import main

if __name__ == "__main__":
    sys.exit(main())
