"""semiseg: semi-supervised semantic segmentation with teacher-student pseudo labelling."""

import os

# albumentations asks PyPI for a newer version when imported (a blocking request of up to 2 s, or a hang behind
# some proxies); semiseg runs offline, so the check is off unless the user turned it on explicitly
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
