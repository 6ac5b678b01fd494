# The tiny-model fixtures of the patch tests (saved random models, one thread).
from tests.patch.conftest import _one_thread, saved_models  # noqa: F401
