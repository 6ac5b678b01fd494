"""fastlora's benchmark suite (pytest-benchmark). Run it with ``fastlora bench``."""
