"""The embedded default run's data: the generated healthcare routing task (``healthcare``)
and the general-knowledge set used to measure forgetting and to mix into training
(``general``). Nothing here is imported or generated at package import time."""
